//! What one worker serves from: the shared immutable index plus this worker's own TLS configs
//! built from it. A connection holds the `Rc<View>` it started with, so a new snapshot never
//! changes the rules under a connection in flight.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use mesh_core::identity::SpiffeId;
use mesh_core::index::Index;
use rustls::{ClientConfig, ServerConfig};

use crate::tls::{self, TlsSetupError, TrustBundle};

pub struct View {
    pub index: Arc<Index>,
    trust: Option<TrustBundle>,
    /// Server configs per local identity (several pods may share one).
    servers: HashMap<SpiffeId, Arc<ServerConfig>>,
    /// Client configs per (source, expected destination), built on first use.
    clients: RefCell<HashMap<(SpiffeId, SpiffeId), Arc<ClientConfig>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("no trust roots usable: {0}")]
    NoTrust(String),
    #[error("no certificate for {0} in the snapshot")]
    NoIdentity(SpiffeId),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

impl View {
    /// Builds a worker's view; problems with one identity are logged and leave only that
    /// identity unable to serve HBONE.
    pub fn build(index: Arc<Index>) -> View {
        let trust = if index.trust_roots().is_empty() {
            None
        } else {
            match TrustBundle::new(index.trust_roots()) {
                Ok(t) => Some(t),
                Err(error) => {
                    tracing::error!(%error, "trust roots in the snapshot are unusable; HBONE is off");
                    None
                }
            }
        };
        let servers = server_configs(&index, trust.as_ref(), &HashMap::new());
        View {
            index,
            trust,
            servers,
            clients: RefCell::new(HashMap::new()),
        }
    }

    /// The view for the next generation. When certificates and roots are the same (a pod or
    /// policy change), every TLS config is carried over and only identities of new local pods
    /// get one, so adopting a one-pod change builds nothing.
    pub fn next(&self, index: Arc<Index>) -> View {
        if !index.same_tls_material(&self.index) {
            return View::build(index);
        }
        let servers = if index.same_local_workloads(&self.index) {
            self.servers.clone()
        } else {
            server_configs(&index, self.trust.as_ref(), &self.servers)
        };
        View {
            index,
            trust: self.trust.clone(),
            servers,
            clients: RefCell::new(self.clients.borrow().clone()),
        }
    }

    pub fn server_config(&self, id: &SpiffeId) -> Option<Arc<ServerConfig>> {
        self.servers.get(id).cloned()
    }

    pub fn client_config(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, ViewError> {
        let key = (source.clone(), destination.clone());
        if let Some(cfg) = self.clients.borrow().get(&key) {
            return Ok(cfg.clone());
        }
        let trust = self
            .trust
            .as_ref()
            .ok_or_else(|| ViewError::NoTrust("snapshot has no trust roots".into()))?;
        let material = self
            .index
            .identity(source)
            .ok_or_else(|| ViewError::NoIdentity(source.clone()))?;
        let cfg = tls::client_config(material, trust, destination.clone())?;
        self.clients.borrow_mut().insert(key, cfg.clone());
        Ok(cfg)
    }
}

/// Server configs for every local identity, reusing those already built in `previous`.
fn server_configs(
    index: &Index,
    trust: Option<&TrustBundle>,
    previous: &HashMap<SpiffeId, Arc<ServerConfig>>,
) -> HashMap<SpiffeId, Arc<ServerConfig>> {
    let mut servers = HashMap::new();
    let Some(trust) = trust else {
        return servers;
    };
    for workload in index.local_workloads() {
        let id = &workload.owner.identity;
        if servers.contains_key(id) {
            continue;
        }
        if let Some(built) = previous.get(id) {
            servers.insert(id.clone(), built.clone());
            continue;
        }
        let Some(material) = index.identity(id) else {
            tracing::warn!(identity = %id, workload = %workload.uid,
                "no certificate for a local identity; its pods refuse inbound HBONE");
            continue;
        };
        match tls::server_config(material, trust, id.trust_domain()) {
            Ok(cfg) => {
                servers.insert(id.clone(), cfg);
            }
            Err(error) => {
                tracing::error!(identity = %id, %error, "cannot serve this identity")
            }
        }
    }
    servers
}
