//! Carries out the replug decisions of [`crate::replug`]: asks the kubelet's pod-resources
//! API which pods hold a replugged stick (or, in DRA mode, a [`HolderSource`] reading the
//! claims' `status.reservedFor`), then creates Events on them or evicts them through the
//! Kubernetes API (the `kube` client, configured from `KUBECONFIG` or the pod's service
//! account, see [`crate::api_client`]).
//!
//! Each Event names its pod by uid too (looked up with a GET), as `kubectl describe pod` lists
//! only Events whose `involvedObject.uid` matches (a [`HolderSource`] that knows the uids spares
//! the GET). Evictions go through a client that does not retry by itself: a
//! PodDisruptionBudget's refusal (HTTP 429) comes back at once, is logged and counted, and the
//! pod is tried again by [`Evictions`]' backoff while other sticks' pods are handled
//! meanwhile; after `evictionRetryFor` an Event on the pod says the plugin gave up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{EvictParams, PostParams};
use kube::{Api, Client};
use nitrokey_proto::podresources_v1::ListPodResourcesRequest;
use nitrokey_proto::podresources_v1::pod_resources_lister_client::PodResourcesListerClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api_client::{self, Retries};
use crate::config::OnReplug;
use crate::metrics::{ActionLabel, Metrics};
use crate::replug::{Evictions, Holder, Refused, Replug, holders};
use crate::state::PluginState;

/// How often queued evictions are looked at again.
const EVICTION_TICK: Duration = Duration::from_secs(1);
/// Longest a pod lookup or an Event creation may take, kube's own retries of transient answers
/// (429, 503, 504) included: they would otherwise hold up replug recovery for minutes.
const API_CALL_BOUND: Duration = Duration::from_secs(15);
/// Reason of the Events this plugin creates.
pub const EVENT_REASON: &str = "NitrokeyHsmReplugged";
/// Component named as the Events' source.
pub const COMPONENT: &str = "nitrokey-device-plugin";

/// Who holds which stick: pods by stick ID, and the uids of those pods the source knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holding {
    /// Pods by stick ID.
    pub by_stick: BTreeMap<String, Vec<Holder>>,
    /// Pod uids, where known.
    pub uids: BTreeMap<Holder, String>,
}

/// Where the holders of sticks are found when not from the kubelet's pod-resources API.
pub trait HolderSource: Send + Sync + 'static {
    /// The current holders, or why they cannot be told (a partial answer would drop queued
    /// evictions of the pods left out).
    fn holding(&self) -> futures::future::BoxFuture<'_, Result<Holding, String>>;
}

impl std::fmt::Debug for dyn HolderSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HolderSource")
    }
}

/// The replug recovery task.
#[derive(Debug)]
pub struct Recovery {
    /// What to do.
    pub mode: OnReplug,
    /// How long a refused eviction is tried again before giving up on the pod.
    pub eviction_retry_for: Duration,
    /// The resource whose units are looked up.
    pub resource: String,
    /// The kubelet's pod-resources socket.
    pub pod_resources_socket: PathBuf,
    /// This node's name, as the Events' source host.
    pub node_name: Option<String>,
    /// Metrics to count into.
    pub metrics: Arc<Metrics>,
    /// The plugin state (when sticks were last allocated).
    pub state: Arc<PluginState>,
    /// Where holders are found instead of the pod-resources API (DRA mode).
    pub source: Option<Arc<dyn HolderSource>>,
}

impl Recovery {
    /// Handles replugs until `shutdown`.
    pub async fn run(
        self,
        mut replugs: mpsc::UnboundedReceiver<Replug>,
        shutdown: CancellationToken,
    ) {
        let mut clients = Clients::default();
        let mut evictions = Evictions::new(self.eviction_retry_for);
        loop {
            let busy = evictions.busy();
            let tick = async {
                if busy {
                    tokio::time::sleep(EVICTION_TICK).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                replug = replugs.recv() => match replug {
                    Some(replug) => self.replugged(replug, &mut clients, &mut evictions).await,
                    None => return,
                },
                () = tick => self.evict_next(&mut clients, &mut evictions).await,
            }
        }
    }

    async fn replugged(&self, replug: Replug, clients: &mut Clients, evictions: &mut Evictions) {
        tracing::info!(stick = %replug.stick, old = %replug.old_path, new = %replug.new_path,
            mode = ?self.mode, "stick re-plugged at another address");
        if self.mode == OnReplug::None {
            return;
        }
        let Some(mut listed) = self.list().await else {
            return;
        };
        let holding = listed.by_stick.remove(&replug.stick).unwrap_or_default();
        if holding.is_empty() {
            tracing::info!(stick = %replug.stick, "no running pod holds the stick");
            return;
        }
        match self.mode {
            OnReplug::None => {}
            OnReplug::Event => {
                for holder in &holding {
                    let uid = listed.uids.get(holder).cloned();
                    self.event(clients, holder, uid, &replug.message()).await;
                }
            }
            OnReplug::Evict => {
                evictions.replugged(&replug, &holding);
                self.evict_next(clients, evictions).await;
            }
        }
    }

    async fn evict_next(&self, clients: &mut Clients, evictions: &mut Evictions) {
        let Some(listed) = self.list().await else {
            return;
        };
        let state = self.state.clone();
        let next = evictions.next(
            &listed.by_stick,
            |stick, since| state.allocated_since(stick, since),
            Instant::now(),
        );
        let Some((holder, replug)) = next else {
            return;
        };
        let Some(api) = self.client(&mut clients.evictions, Retries::Caller).await else {
            evictions.refused(holder, replug, Instant::now());
            return;
        };
        let pods: Api<Pod> = Api::namespaced(api, &holder.namespace);
        let error = match pods.evict(&holder.pod, &EvictParams::default()).await {
            Ok(_) => {
                self.count("evict", "ok");
                tracing::info!(namespace = %holder.namespace, pod = %holder.pod,
                    stick = %replug.stick, "evicted a pod holding the re-plugged stick");
                let message = format!("{}: evicted by {COMPONENT}", replug.message());
                let uid = listed.uids.get(&holder).cloned();
                self.event(clients, &holder, uid, &message).await;
                return;
            }
            Err(e) => e,
        };
        // 429 is the API server's answer while a PodDisruptionBudget does not allow the
        // eviction; anything else may pass as well, and is tried again the same way.
        let by_budget = matches!(&error, kube::Error::Api(s) if s.code == 429);
        self.count("evict", if by_budget { "refused" } else { "error" });
        let why = if by_budget {
            "refused by a PodDisruptionBudget"
        } else {
            "failed"
        };
        match evictions.refused(holder.clone(), replug.clone(), Instant::now()) {
            Refused::RetryIn(wait) => {
                tracing::warn!(namespace = %holder.namespace, pod = %holder.pod,
                    stick = %replug.stick, error = %error, retry_in = ?wait,
                    "eviction {why}; trying again later");
            }
            Refused::GaveUp { refusals, since } => {
                self.count("evict", "gave_up");
                tracing::warn!(namespace = %holder.namespace, pod = %holder.pod,
                    stick = %replug.stick, error = %error, refusals, since = ?since,
                    "eviction {why} for too long; giving up on this pod");
                let message = format!(
                    "{}: eviction {why} {refusals} times over {}; {COMPONENT} gave up",
                    replug.message(),
                    humantime::format_duration(Duration::from_secs(since.as_secs())),
                );
                let uid = listed.uids.get(&holder).cloned();
                self.event(clients, &holder, uid, &message).await;
            }
        }
    }

    /// The current holders of our resource's units, by stick.
    async fn list(&self) -> Option<Holding> {
        if let Some(source) = &self.source {
            return match source.holding().await {
                Ok(holding) => Some(holding),
                Err(e) => {
                    self.count("list", "error");
                    tracing::warn!(error = %e, "cannot tell which pods hold the stick");
                    None
                }
            };
        }
        let listed = async {
            let channel = crate::kubelet::unix_channel(&self.pod_resources_socket).await?;
            PodResourcesListerClient::new(channel)
                .list(ListPodResourcesRequest {})
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match listed {
            Ok(response) => Some(Holding {
                by_stick: holders(&response.into_inner().pod_resources, &self.resource),
                uids: BTreeMap::new(),
            }),
            Err(e) => {
                self.count("list", "error");
                tracing::warn!(socket = %self.pod_resources_socket.display(), error = %e,
                    "cannot ask the kubelet which pods hold the stick");
                None
            }
        }
    }

    async fn client(&self, client: &mut Option<Client>, retries: Retries) -> Option<Client> {
        if client.is_none() {
            match api_client::connect(retries).await {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    self.count("connect", "error");
                    tracing::warn!(error = %e, "no Kubernetes API access for replug recovery");
                }
            }
        }
        client.clone()
    }

    async fn event(
        &self,
        clients: &mut Clients,
        holder: &Holder,
        uid: Option<String>,
        message: &str,
    ) {
        let Some(api) = self.client(&mut clients.events, Retries::Client).await else {
            return;
        };
        // The pod's uid, without which `kubectl describe pod` does not list the Event.
        let pods = Api::<Pod>::namespaced(api.clone(), &holder.namespace);
        let uid = match uid {
            Some(uid) => Some(uid),
            None => match bounded(pods.get(&holder.pod)).await {
                Ok(pod) => pod.metadata.uid,
                Err(e) => {
                    self.count("get", "error");
                    tracing::warn!(namespace = %holder.namespace, pod = %holder.pod, error = %e,
                    "cannot look up the pod's uid; its Event will not show in kubectl describe");
                    None
                }
            },
        };
        let now = Time(jiff_now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", holder.pod)),
                namespace: Some(holder.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(holder.pod.clone()),
                namespace: Some(holder.namespace.clone()),
                uid,
                ..ObjectReference::default()
            },
            reason: Some(EVENT_REASON.into()),
            message: Some(message.to_owned()),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: self.node_name.clone(),
            }),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: self.node_name.clone(),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        let events: Api<Event> = Api::namespaced(api, &holder.namespace);
        match bounded(events.create(&PostParams::default(), &event)).await {
            Ok(_) => {
                self.count("event", "ok");
                tracing::info!(namespace = %holder.namespace, pod = %holder.pod, message,
                    "event created on a pod holding the re-plugged stick");
            }
            Err(e) => {
                self.count("event", "error");
                tracing::warn!(namespace = %holder.namespace, pod = %holder.pod, error = %e,
                    "cannot create the event");
            }
        }
    }

    fn count(&self, action: &'static str, result: &'static str) {
        self.metrics
            .replug_actions
            .get_or_create(&ActionLabel { action, result })
            .inc();
    }
}

/// The API clients, made when first needed: one for Events and lookups (kube retries
/// transient answers), one for evictions (it does not: see [`Retries::Caller`]).
#[derive(Default)]
struct Clients {
    events: Option<Client>,
    evictions: Option<Client>,
}

/// `call`, or an error saying it took longer than [`API_CALL_BOUND`].
async fn bounded<T>(call: impl Future<Output = Result<T, kube::Error>>) -> Result<T, BoundedError> {
    match tokio::time::timeout(API_CALL_BOUND, call).await {
        Ok(result) => result.map_err(BoundedError::Api),
        Err(_) => Err(BoundedError::TimedOut),
    }
}

/// Why a bounded API call failed.
#[derive(Debug, thiserror::Error)]
enum BoundedError {
    #[error(transparent)]
    Api(kube::Error),
    #[error("no answer within {API_CALL_BOUND:?}, retries included")]
    TimedOut,
}

/// Now, in the time type of the Kubernetes API types.
fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
