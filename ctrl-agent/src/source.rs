//! Where the agent's model comes from: the local file, reread at each tick, or the cluster,
//! whose watchers hand over a new model when something changed. The agent loop treats both
//! alike: a new model replaces the old, and the same translation and publishing follow.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use crate::agent::AgentError;
use crate::config::FileConfig;
use crate::kube_source::redirection::RedirectionSender;
use crate::kube_source::{self, Handoff, KubeOptions};
use crate::metrics::AgentMetrics;

#[derive(Clone, Debug)]
pub enum SourceOptions {
    /// The local YAML file.
    File(PathBuf),
    /// The Kubernetes API server.
    Kube(Box<KubeOptions>),
}

pub enum Source {
    File {
        path: PathBuf,
        /// Bytes last looked at (good or bad), to notice changes.
        last_seen: Option<Vec<u8>>,
    },
    Kube {
        handoff: Arc<Handoff>,
        cluster: String,
        /// Captured pods to annotate as Istio's CNI does.
        redirections: RedirectionSender,
    },
}

impl Source {
    /// Opens the source; the Kubernetes one starts its watchers, which call `wake` when they
    /// have a new model.
    pub fn start(
        options: SourceOptions,
        wake: mpsc::Sender<()>,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Source, AgentError> {
        match options {
            SourceOptions::File(path) => Ok(Source::File {
                path,
                last_seen: None,
            }),
            SourceOptions::Kube(options) => {
                let cluster = options.client.cluster_url.to_string();
                let handoff = Arc::new(Handoff::default());
                let (redirections, to_annotate) = tokio::sync::mpsc::unbounded_channel();
                kube_source::start(*options, handoff.clone(), wake, to_annotate, metrics)
                    .map_err(AgentError::Start)?;
                Ok(Source::Kube {
                    handoff,
                    cluster,
                    redirections,
                })
            }
        }
    }

    /// Where captured pods' redirection annotations go: the cluster's API server, if the
    /// source is one.
    pub fn redirections(&self) -> Option<RedirectionSender> {
        match self {
            Source::File { .. } => None,
            Source::Kube { redirections, .. } => Some(redirections.clone()),
        }
    }

    /// Whether the model comes from a cluster's API server.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Source::Kube { .. })
    }

    /// The new model, if the source changed since the last call. An error means the file
    /// was refused (it is not reported again until it changes).
    pub fn poll(&mut self) -> Result<Option<Arc<FileConfig>>, AgentError> {
        match self {
            Source::File { path, last_seen } => {
                let shown = path.display().to_string();
                let bytes = match std::fs::read(&*path) {
                    Ok(bytes) => bytes,
                    Err(source) => {
                        // The file is read again in full when it is back, even unchanged:
                        // that is when the source is good again.
                        *last_seen = None;
                        return Err(AgentError::Read {
                            path: shown,
                            source,
                        });
                    }
                };
                if last_seen.as_deref() == Some(bytes.as_slice()) {
                    return Ok(None);
                }
                *last_seen = Some(bytes.clone());
                let text = String::from_utf8_lossy(&bytes);
                FileConfig::parse(&text)
                    .map(|config| Some(Arc::new(config)))
                    .map_err(|problem| AgentError::Config {
                        path: shown,
                        problem,
                    })
            }
            Source::Kube { handoff, .. } => Ok(handoff.take()),
        }
    }

    /// Where the published snapshot came from, for its `source` field.
    pub fn describe(&self) -> String {
        match self {
            Source::File { path, last_seen } => {
                let digest = crc32c::crc32c(last_seen.as_deref().unwrap_or_default());
                format!("file:{} crc32c={digest:08x}", path.display())
            }
            Source::Kube { cluster, .. } => format!("kube:{cluster}"),
        }
    }
}
