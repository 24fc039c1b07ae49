//! deploy/kubernetes and deploy/Dockerfile: the Kustomize base (`deploy/kubernetes`, which
//! applies on any cluster) and the example overlay with both components
//! (`deploy/examples/production`: Prometheus Operator objects, the durable queue on a
//! StatefulSet's claims) render with `kubectl kustomize`, every object validates against
//! the Kubernetes schemas (`kubernetes-validate --strict`), the pieces agree with each
//! other and with the daemon's config, and the Dockerfile passes hadolint and the image
//! rules.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool from the test virtualenv (tests/install-deps.sh).
fn venv_bin(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/.venv/bin")
        .join(name)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} cannot run ({e}); run tests/install-deps.sh"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `kubectl kustomize` of a directory under deploy/.
fn kustomize(dir: &str) -> String {
    run(Command::new(venv_bin("kubectl"))
        .args(["kustomize"])
        .arg(root().join("deploy").join(dir)))
}

fn parse(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

/// What `kubectl apply -k deploy/kubernetes` applies.
fn rendered() -> Vec<Value> {
    parse(&kustomize("kubernetes"))
}

/// The example overlay with both components.
fn production() -> Vec<Value> {
    parse(&kustomize("examples/production"))
}

fn kinds(objects: &[Value]) -> Vec<&str> {
    let mut kinds: Vec<&str> = objects.iter().map(|o| str_of(&o["kind"])).collect();
    kinds.sort();
    kinds
}

/// Runs `kubernetes-validate --strict` on rendered text; returns how many objects passed.
fn validated(text: &str) -> (usize, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, text).unwrap();
    let report = run(Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "-k", "1.33.0"])
        .arg(&file));
    (report.matches(" passed for resource ").count(), report)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name))
        })
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

#[test]
fn the_kustomization_renders_objects_that_validate() {
    // The base applies on any cluster: built-in kinds only, every one valid.
    let text = kustomize("kubernetes");
    assert_eq!(
        kinds(&parse(&text)),
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "Service"
        ]
    );
    let (passed, report) = validated(&text);
    assert_eq!(passed, 6, "{report}");
    // The example overlay adds the Prometheus Operator's two kinds (no bundled schema:
    // checked below) and swaps the Deployment for a StatefulSet.
    let text = kustomize("examples/production");
    assert_eq!(
        kinds(&parse(&text)),
        [
            "ConfigMap",
            "ConfigMap",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "Service",
            "ServiceMonitor",
            "StatefulSet"
        ]
    );
    let (passed, report) = validated(&text);
    assert_eq!(passed, 6, "{report}");
}

#[test]
fn the_deployment_matches_the_config_and_runs_locked_down() {
    let objects = rendered();
    let config_map = find(&objects, "ConfigMap", "llmtail-config");
    let config = str_of(&config_map["data"]["config.yaml"]);
    // The config is valid for the daemon, with what the Deployment puts in the environment.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).unwrap();
    // Outside a pod too, with nothing set by hand (the documented local check).
    for with_env in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmtail"));
        cmd.args(["--validate", "--config"])
            .arg(&path)
            .env_remove("POD_IP")
            .env_remove("LLMTAIL_UPSTREAM_ENDPOINT");
        if with_env {
            cmd.env("POD_IP", "10.1.2.3")
                .env("LLMTAIL_UPSTREAM_ENDPOINT", "http://collector:4317");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The file in the repository is the one the ConfigMap carries.
    assert_eq!(
        config,
        std::fs::read_to_string(root().join("deploy/kubernetes/base/config.yaml")).unwrap()
    );
    let cfg: Value = serde_yaml_ng::from_str(config).unwrap();

    let deployment = find(&objects, "Deployment", "llmtail");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // The ConfigMap the pod mounts is the generated one (with its hash suffix).
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    // The preStop delay, then graceful shutdown, fit in the grace period.
    let shutdown = humantime::parse_duration(str_of(&cfg["shutdown_timeout"])).unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop sleep");
    assert!(pre_stop >= 3, "endpoints need seconds to drain: {pre_stop}");
    assert!(
        grace > pre_stop + shutdown.as_secs(),
        "{grace}s ≤ {pre_stop}s + {shutdown:?}"
    );
    // The upstream comes from the one ConfigMap the kustomization generates.
    let upstream = find(&objects, "ConfigMap", "llmtail-upstream");
    assert!(
        str_of(&upstream["data"]["LLMTAIL_UPSTREAM_ENDPOINT"]).starts_with("http://"),
        "{upstream:?}"
    );
    let upstream_env = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "LLMTAIL_UPSTREAM_ENDPOINT")
        .expect("LLMTAIL_UPSTREAM_ENDPOINT in the pod");
    assert_eq!(
        upstream_env["valueFrom"]["configMapKeyRef"]["name"],
        upstream["metadata"]["name"]
    );
    assert_eq!(
        str_of(&cfg["exporter"]["otlp"]["endpoint"]),
        "${env:LLMTAIL_UPSTREAM_ENDPOINT:-http://upstream.invalid:4317}"
    );
    // Probes on the admin port.
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let admin_port = str_of(&cfg["admin"]["endpoint"])
        .rsplit(':')
        .next()
        .unwrap();
    let ports = container["ports"].as_sequence().unwrap();
    assert!(
        ports.iter().any(|p| p["name"] == "admin"
            && p["containerPort"].as_u64().unwrap().to_string() == admin_port)
    );
    // Locked down.
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    // Writable only where the config writes: the trace log on the data volume.
    let queue = str_of(&cfg["storage"]["directory"]);
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| queue.starts_with(str_of(&m["mountPath"])) && m["name"] == "data")
    );
    // Memory: requests equal limits (no overcommit), and the buffer default is half of it.
    let limits = &container["resources"]["limits"]["memory"];
    assert_eq!(limits, &container["resources"]["requests"]["memory"]);
    assert!(
        cfg.get("limits").is_none(),
        "the buffer follows the memory limit"
    );
    // The peers' DNS name is the headless Service, on the gRPC port; self is the pod IP.
    let peers = find(&objects, "Service", "llmtail-peers");
    assert_eq!(peers["spec"]["clusterIP"], "None");
    let dns = str_of(&cfg["cluster"]["dns"]);
    assert_eq!(dns, format!("{}:4317", str_of(&peers["metadata"]["name"])));
    assert_eq!(
        str_of(&cfg["cluster"]["self"]),
        "${env:POD_IP:-127.0.0.1}:4317"
    );
    let env = container["env"].as_sequence().unwrap();
    assert!(env.iter().any(
        |e| e["name"] == "POD_IP" && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ));
    // Both Services select the pods.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for svc in ["llmtail", "llmtail-peers"] {
        let svc = objects
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == svc)
            .unwrap();
        for (k, v) in svc["spec"]["selector"].as_mapping().unwrap() {
            assert_eq!(&labels[k], v, "{svc:?}");
        }
    }
    // The PDB selects the pods.
    let pdb = find(&objects, "PodDisruptionBudget", "llmtail");
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&labels[k], v);
    }
}

#[test]
fn the_prometheus_rule_carries_the_alert_rules_unchanged() {
    let objects = production();
    let rule = find(&objects, "PrometheusRule", "llmtail");
    let file: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/llmtail-rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    // The ServiceMonitor scrapes the peers Service's admin port.
    let peers = find(&objects, "Service", "llmtail-peers");
    let monitor = find(&objects, "ServiceMonitor", "llmtail");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(&peers["metadata"]["labels"][k], v);
    }
    let port = str_of(&monitor["spec"]["endpoints"][0]["port"]);
    assert!(
        peers["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port)
    );
}

#[test]
fn the_durable_queue_component_runs_the_same_pods_with_a_claim_each() {
    let base = rendered();
    let objects = production();
    let deployment = find(&base, "Deployment", "llmtail");
    let set = find(&objects, "StatefulSet", "llmtail");
    // The overlay's own namespace and upstream, and the labels (set after the components).
    assert_eq!(set["metadata"]["namespace"], "observability");
    assert_eq!(
        set["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "llmtail"
    );
    let upstream = find(&objects, "ConfigMap", "llmtail-upstream");
    assert_eq!(
        str_of(&upstream["data"]["LLMTAIL_UPSTREAM_ENDPOINT"]),
        "http://tempo-distributor.observability:4317"
    );
    // Pods identical to the Deployment's (generated names aside), but for the data volume,
    // which is a claim per replica that outlives its pod.
    let mut a = deployment["spec"]["template"].clone();
    let mut b = set["spec"]["template"].clone();
    for t in [&mut a, &mut b] {
        let pod = t["spec"].as_mapping_mut().unwrap();
        let volumes = pod
            .get_mut("volumes")
            .and_then(Value::as_sequence_mut)
            .unwrap();
        volumes.retain(|v| v["name"] != "data");
        for v in volumes.iter_mut() {
            v["configMap"]["name"] = Value::from("generated");
        }
        let env = pod["containers"][0]["env"].as_sequence_mut().unwrap();
        for e in env.iter_mut() {
            if let Some(r) = e
                .get_mut("valueFrom")
                .and_then(|v| v.get_mut("configMapKeyRef"))
            {
                r["name"] = Value::from("generated");
            }
        }
    }
    assert_eq!(a, b, "the StatefulSet's pods drifted from the Deployment's");
    assert!(
        set["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "data"),
        "no emptyDir for the queue"
    );
    let claims = set["spec"]["volumeClaimTemplates"].as_sequence().unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0]["metadata"]["name"], "data");
    let mounts = set["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "data"));
    assert_eq!(
        set["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"],
        "Retain"
    );
    // The claim holds the trace log's bound.
    let config: Value = serde_yaml_ng::from_str(str_of(
        &find(&objects, "ConfigMap", "llmtail-config")["data"]["config.yaml"],
    ))
    .unwrap();
    let max_disk: llmtail::units::ByteSize =
        serde_yaml_ng::from_value(config["storage"]["max_disk_bytes"].clone()).unwrap();
    // A Kubernetes quantity in Mi or Gi: the same with a B.
    let quantity = str_of(&claims[0]["spec"]["resources"]["requests"]["storage"]);
    let storage: llmtail::units::ByteSize =
        serde_yaml_ng::from_value(Value::from(format!("{quantity}B"))).unwrap();
    assert!(storage.0 > max_disk.0, "{} ≤ {}", storage.0, max_disk.0);
    // Named through the headless Service; no Deployment left beside it.
    assert_eq!(set["spec"]["serviceName"], "llmtail-peers");
    assert!(!objects.iter().any(|o| o["kind"] == "Deployment"));
}

#[test]
fn the_dockerfile_passes_hadolint_caches_dependencies_and_builds_a_small_non_root_image() {
    let path: &Path = &root().join("deploy/Dockerfile");
    run(Command::new(venv_bin("hadolint")).arg(path));
    let text = std::fs::read_to_string(path).unwrap();
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .copied()
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(froms.last().unwrap().contains("distroless"), "{froms:?}");
    let final_stage = instructions
        .rsplit(|l| l.starts_with("FROM "))
        .next()
        .unwrap();
    let user = final_stage
        .iter()
        .find(|l| l.starts_with("USER "))
        .expect("a USER");
    assert!(!user.contains("root") || user.contains("nonroot"), "{user}");
    assert!(!user.ends_with(" 0") && !user.contains(" 0:"), "{user}");
    assert!(!instructions.iter().any(|l| l.starts_with("HEALTHCHECK")));
    assert!(
        final_stage
            .iter()
            .any(|l| l.starts_with("COPY config.yaml"))
    );
    assert!(text.contains("--locked"), "built from Cargo.lock");
    // A dependency layer that survives source changes: in the stage that builds llmtail,
    // dependencies are built from the recipe (manifests and lock file only) before the
    // sources are copied in.
    let stages: Vec<&[&str]> = instructions.split(|l| l.starts_with("FROM ")).collect();
    let build = stages
        .iter()
        .find(|stage| stage.iter().any(|l| l.contains("cargo build --release")))
        .expect("a build stage");
    let position = |what: &str| build.iter().position(|l| l.contains(what));
    let cook = position("cargo chef cook").expect("dependencies cooked in the build stage");
    let sources = position("COPY . .").expect("sources copied into the build stage");
    assert!(
        cook < sources,
        "the dependency layer comes before the sources"
    );
    assert!(
        build[..cook]
            .iter()
            .filter(|l| l.starts_with("COPY"))
            .all(|l| l.contains("recipe.json")),
        "only the recipe before the dependency layer: {build:?}"
    );
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for big in ["target", "tests/.venv", "tests/node/node_modules"] {
        assert!(
            ignored.lines().any(|l| l == big),
            "{big} in the build context"
        );
    }
    // The shipped config listens on 127.0.0.1 unless told otherwise; the image tells it
    // to listen on every interface, through the documented variables.
    let shipped = include_str!("../../config.yaml");
    for var in [
        "LLMTAIL_GRPC_ENDPOINT",
        "LLMTAIL_HTTP_ENDPOINT",
        "LLMTAIL_ADMIN_ENDPOINT",
    ] {
        assert!(
            shipped.contains(&format!("${{env:{var}:-127.0.0.1:")),
            "{var}"
        );
        assert!(
            text.contains(&format!("{var}=0.0.0.0:")),
            "{var} in the image"
        );
    }
    // The trace log: ./llmtail-data from a checkout, the image's data volume in a container.
    assert!(shipped.contains("${env:LLMTAIL_STORAGE_DIRECTORY:-./llmtail-data}"));
    assert!(text.contains("LLMTAIL_STORAGE_DIRECTORY=/var/lib/llmtail/"));
}
