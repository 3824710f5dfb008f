//! Checks every Kubernetes manifest the project ships, without a cluster.
//!
//! Each kustomization under `deploy/` is rendered with `kubectl kustomize`, and the Helm chart
//! with Helm's own engine; every object is parsed into its `k8s-openapi` type and serialised back,
//! once with the newest API types and once with those of the oldest Kubernetes the project
//! supports (1.26), and any field lost on the way (a misspelt or misplaced field, or one that
//! older API server rejects or silently drops) fails the test. The programs' configs embedded in
//! the manifests are parsed and validated by the programs' own configuration code. On top of
//! that, what an operator would trip over is asserted: image names and tags against the
//! Dockerfile, ports and probes against the configs, TLS between unseal-init and Vault, the PIN
//! as a mounted file, the device plugin's mounts and privileges, RBAC limited to what the
//! programs call, and one name for each thing across manifests and documentation.
//!
//! One test binary, one module per concern: `kustomize` (every kustomization rendered and
//! checked), `helm` (the chart), `cluster_writes` (what the manifests may change in a
//! cluster), `docs` (names, versions and tags the documentation states), `guide_commands`
//! (the deploy guide's stick commands against the installed tools), `minikube` (the
//! VirtualBox passthrough script); `checks` holds the checks of one rendering that need the
//! programs' configuration code or Kubernetes 1.26's API types, and `nitrokey_e2e::manifests`
//! the rendering and accessors.

mod checks;
mod cluster_writes;
mod docs;
mod guide_commands;
mod helm;
mod kustomize;
mod minikube;
