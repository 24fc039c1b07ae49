//! File "upstream" for running without a backend: appends each export request as one line
//! of OTLP/JSON.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::SendError;

/// Removes every `null` member of every object (absent messages and fields).
fn drop_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

pub struct FileSink {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
}

impl FileSink {
    pub async fn open(path: &Path) -> std::io::Result<FileSink> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        Ok(FileSink {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    pub async fn send(&self, request: Bytes) -> Result<super::Rejected, SendError> {
        let decoded = ExportTraceServiceRequest::decode(request)
            .map_err(|e| SendError::BadData(format!("re-framed request does not decode: {e}")))?;
        let mut value = serde_json::to_value(&decoded)
            .map_err(|e| SendError::Permanent(format!("cannot write OTLP/JSON: {e}")))?;
        // Canonical OTLP/JSON leaves absent fields out rather than writing `null`.
        drop_nulls(&mut value);
        let mut line = serde_json::to_vec(&value)
            .map_err(|e| SendError::Permanent(format!("cannot write OTLP/JSON: {e}")))?;
        line.push(b'\n');
        let mut file = self.file.lock().await;
        let written = async {
            file.write_all(&line).await?;
            file.flush().await
        };
        written.await.map_err(|e| {
            SendError::Retryable(format!("writing {}: {e}", self.path.display()), None)
        })?;
        Ok(super::Rejected::default())
    }
}
