//! The trace log on a real directory: records held by pins, replayed after a restart, the
//! disk bound kept before a write, segments freed in any order.

use super::*;
use crate::units::ByteSize;

fn config(dir: &Path, segment: usize, max: Option<usize>) -> StorageConfig {
    StorageConfig {
        directory: Some(dir.to_owned()),
        segment_bytes: ByteSize(segment),
        max_disk_bytes: max.map(ByteSize),
        ..StorageConfig::default()
    }
}

fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| record::segment_first_seq(&e.as_ref().unwrap().path()).is_some())
        .count()
}

/// Waits (bounded) until the writer has done what `done` checks.
fn wait_until(mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the writer did not get there"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn replayed(replay: Replay) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    replay.run(|rec, pin, _| {
        assert_eq!(pin.seq(), rec.seq);
        out.push((rec.seq, rec.payload.to_vec()));
    });
    out
}

#[tokio::test]
async fn held_records_survive_a_restart_with_the_marks_beside_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 20, None);
    let (log, replay) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
    assert!(replay.is_empty());
    let a = log.append(Bytes::from_static(b"first")).await.unwrap();
    let b = log.append(Bytes::from_static(b"second")).await.unwrap();
    let c = log.append(Bytes::from_static(b"third")).await.unwrap();
    assert_eq!((a.seq(), b.seq(), c.seq()), (0, 1, 2));
    log.mark(&[Mark::Delivered {
        trace: [1; 16],
        seq: 1,
        spans: 4,
    }]);
    drop(b);
    // A crash: the process ends with a and c still held.
    log.close();
    drop(log);
    let (log, replay) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
    assert_eq!(replay.marks.delivered(&[1; 16], 1), 4);
    let got = replayed(replay);
    // The segment was held as a whole: all three records are read back (the marks say
    // what of them is done), and new ones come after them.
    assert_eq!(
        got,
        [
            (0, b"first".to_vec()),
            (1, b"second".to_vec()),
            (2, b"third".to_vec())
        ]
    );
    let d = log.append(Bytes::from_static(b"fourth")).await.unwrap();
    assert_eq!(d.seq(), 3);
    // A record reads back by its pin.
    assert_eq!(&log.read(&d).unwrap().payload[..], b"fourth");
    drop((a, c));
}

#[tokio::test]
async fn segments_are_deleted_in_any_order_once_no_pin_holds_them_and_disk_returns_to_the_marks() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of 64 KiB: a 40 KB record fills one, so each record gets its own.
    let cfg = config(dir.path(), 64 << 10, None);
    let (log, _) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
    let payload = Bytes::from(vec![7u8; 70_000]);
    let mut pins = Vec::new();
    for _ in 0..6 {
        pins.push(Some(log.append(payload.clone()).await.unwrap()));
    }
    assert_eq!(segments(dir.path()), 6);
    let (used, _) = log.usage();
    assert!(used >= 6 * 70_000, "{used}");
    // Released out of order: the newest (the current segment) and a middle one first.
    for i in [5, 2, 0, 4, 1, 3] {
        pins[i] = None;
        wait_until(|| segments(dir.path()) == pins.iter().flatten().count());
    }
    wait_until(|| log.usage().0 == 0);
    // The log goes on in a new segment.
    let again = log.append(payload.clone()).await.unwrap();
    assert_eq!(again.seq(), 6);
    assert_eq!(segments(dir.path()), 1);
}

#[tokio::test]
async fn after_keep_all_a_segment_stays_when_its_last_pin_goes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 64 << 10, None);
    let (log, _) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
    let payload = Bytes::from(vec![7u8; 70_000]);
    let delivered = log.append(payload.clone()).await.unwrap();
    let abandoned = log.append(payload.clone()).await.unwrap();
    drop(delivered);
    wait_until(|| segments(dir.path()) == 1);
    // Shutting down: a queued span is dropped undelivered; its record stays for the next
    // start.
    log.keep_all();
    drop(abandoned);
    // The writer looks for segments to delete after each round of commands: two syncs
    // answered mean one such look at least came between them.
    log.sync().await;
    log.sync().await;
    assert_eq!(segments(dir.path()), 1);
    log.close();
    drop(log);
    let (_, replay) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
    assert_eq!(replay.segments(), 1);
}

#[tokio::test]
async fn a_full_log_refuses_before_writing_and_takes_again_once_room_returns() {
    let dir = tempfile::tempdir().unwrap();
    // Records of 70 KB in segments of 64 KiB (one each), at most 160 KiB: two fit.
    let cfg = config(dir.path(), 64 << 10, Some(160 << 10));
    let (log, _) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
    let payload = Bytes::from(vec![1u8; 70_000]);
    let a = log.append(payload.clone()).await.unwrap();
    let _b = log.append(payload.clone()).await.unwrap();
    let before = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(matches!(
        log.append(payload.clone()).await,
        Err(StorageError::Full)
    ));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        before,
        "nothing written"
    );
    assert!(log.usage().0 <= 160 << 10);
    drop(a);
    wait_until(|| log.usage().0 < 80_000);
    assert!(log.append(payload).await.is_ok());
}

#[tokio::test]
async fn a_torn_record_is_cut_and_everything_before_it_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 20, None);
    let pins = {
        let (log, _) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
        let mut pins = Vec::new();
        for i in 0..5u8 {
            pins.push(log.append(Bytes::from(vec![i; 1000])).await.unwrap());
        }
        log.close();
        pins
    };
    let seg = record::segment_path(dir.path(), 0);
    let len = std::fs::metadata(&seg).unwrap().len();
    // Cut in the middle of the last record.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 500)
        .unwrap();
    let (log, replay) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
    let got = replayed(replay);
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(got.iter().all(|(s, p)| p == &vec![*s as u8; 1000]));
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        len - (record::HEADER as u64 + 1000)
    );
    // The log goes on after the tear, never reusing a sequence number it replayed.
    let next = log.append(Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(next.seq(), 4);
    drop(pins);
}

#[tokio::test]
async fn a_second_process_on_the_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 20, None);
    let (_log, _) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
    let err = TraceLog::open(&cfg, StorageMetrics::unregistered())
        .err()
        .unwrap();
    assert!(err.to_string().contains("another llmtail"), "{err}");
}

#[test]
fn the_bound_is_the_smaller_of_the_setting_and_the_free_space_less_a_margin() {
    let gib = 1u64 << 30;
    // 100 GiB disk, 10 GiB free, 1 GiB ours: 11 GiB less 64 MiB, under the default 80 GiB.
    assert_eq!(
        bound(None, gib, (100 * gib, 10 * gib)),
        11 * gib - (64 << 20)
    );
    assert_eq!(bound(Some(2 * gib), gib, (100 * gib, 10 * gib)), 2 * gib);
    // A small tmpfs: the margin is a twentieth of it.
    let mib = 1u64 << 20;
    assert_eq!(bound(None, 0, (8 * mib, 8 * mib)), (8 * mib * 8) / 10);
    assert_eq!(
        bound(Some(8 * mib), 0, (8 * mib, 8 * mib)),
        8 * mib - 8 * mib / 20
    );
}

#[tokio::test]
async fn a_records_payload_is_a_slice_of_the_mapped_segment_that_keeps_it_until_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 64 << 10, None);
    let (log, _) = TraceLog::open(&cfg, StorageMetrics::unregistered()).unwrap();
    let first = Bytes::from(vec![3u8; 50_000]);
    let pin = log.append(first.clone()).await.unwrap();
    let payload = pin.payload();
    assert_eq!(payload, first);
    // Not the request's buffer: the log's copy.
    assert_ne!(payload.as_ptr(), first.as_ptr());
    // A second record goes past the first segment's 64 KiB: a segment of its own, and the
    // first segment's bytes stay as they were.
    let second = Bytes::from(vec![4u8; 50_000]);
    let pin2 = log.append(second.clone()).await.unwrap();
    assert!(!pin.same_segment(&pin2));
    assert_eq!(pin2.payload(), second);
    // A record larger than a segment gets one of its size.
    let large = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>());
    let pin3 = log.append(large.clone()).await.unwrap();
    assert_eq!(pin3.payload(), large);
    // The slice alone keeps the first segment: dropping the pin deletes nothing.
    drop((pin, pin2, pin3));
    wait_until(|| segments(dir.path()) == 1);
    assert_eq!(payload, first);
    drop(payload);
    wait_until(|| segments(dir.path()) == 0);
}

#[tokio::test]
async fn a_log_in_memory_takes_the_same_path_bounded_by_max_disk_bytes_and_frees_what_is_done() {
    let cfg = StorageConfig {
        memory: true,
        segment_bytes: ByteSize(64 << 10),
        max_disk_bytes: Some(ByteSize(200 << 10)),
        ..StorageConfig::default()
    };
    let metrics = StorageMetrics::unregistered();
    let (log, replay) = TraceLog::open(&cfg, metrics.clone()).unwrap();
    assert!(log.in_memory());
    assert!(replay.is_empty());
    assert_eq!(log.usage(), (0, 200 << 10));
    let payload = Bytes::from((0..70_000u32).map(|i| i as u8).collect::<Vec<_>>());
    let a = log.append(payload.clone()).await.unwrap();
    let b = log.append(payload.clone()).await.unwrap();
    // Read back from the mapped memory, as from a file.
    assert_eq!(a.payload(), payload);
    assert_eq!(&log.read(&b).unwrap().payload[..], &payload[..]);
    assert!(!a.same_segment(&b));
    // The third does not fit in 200 KiB less the marks' share: refused before writing.
    assert!(matches!(
        log.append(payload.clone()).await,
        Err(StorageError::Full)
    ));
    // Marks are not kept in memory (nothing replays them).
    log.mark(&[Mark::Decided {
        trace: [1; 16],
        seq: a.seq(),
        bits: 0,
        reason: 0,
    }]);
    drop((a, b));
    wait_until(|| log.usage().0 == 0);
    wait_until(|| metrics.segments.get() == 0);
    assert_eq!(metrics.decided_marks.get(), 0);
    assert!(log.append(payload).await.is_ok());
}
