# Vault server configuration (mounted at /config/vault.hcl). Works unchanged for OpenBao.
ui            = true
# Integrated storage memory-maps its database; mlock would pin all of it.
disable_mlock = true

# TLS from the Secret vault-tls (deploy/README.md, "TLS"): unseal-init in the same pod, the
# raft peers and every client check this certificate against its ca.crt.
listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_cert_file   = "/vault/tls/tls.crt"
  tls_key_file    = "/vault/tls/tls.key"
  tls_min_version = "tls12"
}

# Raft: node id, API and cluster addresses come from VAULT_RAFT_NODE_ID, VAULT_API_ADDR and
# VAULT_CLUSTER_ADDR (BAO_* for OpenBao), set per pod in the StatefulSet.
storage "raft" {
  path = "/data/raft"
}
