//! Real-peer harnesses for the project's tests, benchmarks and local demo.
//!
//! # Layout
//!
//! No NitroKey HSM, USB stick, kubelet or Vault exists on a build machine, so each peer is
//! replaced by the closest real thing that does run here, wrapped in one module each:
//!
//! - [`usb`]: a umockdev testbed, so that libusb inside the device plugin enumerates an emulated
//!   Nitrokey HSM (20a0:4230) and receives hotplug events when the test adds or removes it.
//! - [`kubelet`]: a stand-in for the kubelet's device manager: serves `Registration` on
//!   `kubelet.sock`, dials the plugin back while `Register` is in flight, consumes
//!   `ListAndWatch`, calls `Allocate`, and restarts the way a real kubelet does.
//! - [`pod_resources`]: a stand-in for the kubelet's pod-resources API (who holds which
//!   device), gRPC on a unix socket.
//! - [`kube_api`]: a stand-in for the Kubernetes API server accepting Events, evictions (with
//!   429 for a PodDisruptionBudget), Node label patches and Secrets (get, merge patch, create
//!   with 409 when it exists), talked to by the real `kube` client.
//! - [`kube_api_dra`]: the API stand-in's ResourceSlices (server-side apply) and ResourceClaims.
//! - [`kubelet_dra`]: a stand-in for the kubelet's plugin watcher and DRA manager: registers a
//!   DRA driver through its registration socket and calls `NodePrepareResources` /
//!   `NodeUnprepareResources` on its node service.
//! - [`token`]: what every PKCS#11 token harness offers tests ([`token::Token`]): the module
//!   and slot to point the program at, and set-up and inspection from outside it with OpenSC's
//!   `pkcs11-tool` and `openssl`, so a test can run on either token below.
//! - [`softhsm`]: a SoftHSM2 token in a temporary directory, set up like a freshly initialised
//!   stick (label `bank-vaults`, RSA-2048 key pair `bank-vaults`).
//! - [`tpm`]: a second real token, a software TPM behind the TPM2 PKCS#11 module, with the
//!   traits SoftHSM2 lacks (sticky failed decrypts, OAEP-SHA256, shared serials, TPM restarts).
//! - [`openbao`]: a real OpenBao server (Vault's API) on 127.0.0.1, started sealed.
//! - [`bins`]: where the workspace's own binaries were built; [`unseal_init`]: the sidecar's
//!   command line against one token and one OpenBao.
//! - [`dockerfile`]: the Dockerfile's instructions, per stage; [`host`]: the repository's root
//!   and whether the tools and privileges a test needs are here; [`ports`]: free TCP ports
//!   outside the kernel's ephemeral range, for the servers tests start.
//! - [`manifests`]: the kustomizations and the Helm chart rendered into objects, their round
//!   trip through the Kubernetes API types, and accessors for what the manifest tests check.
//!
//! The programs under test are always run as child processes, exactly as an operator runs them;
//! the harnesses only drive their peers.

pub mod bins;
pub mod dockerfile;
pub mod host;
pub mod kube_api;
pub mod kube_api_dra;
pub mod kubelet;
pub mod kubelet_dra;
pub mod manifests;
pub mod openbao;
pub mod pod_resources;
pub mod ports;
pub mod softhsm;
pub mod token;
pub mod tpm;
pub mod unseal_init;
pub mod usb;
