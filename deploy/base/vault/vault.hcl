# Vault server configuration (mounted at /config/vault.hcl). Works unchanged for OpenBao.
ui            = true
# Integrated storage memory-maps its database; mlock would pin all of it.
disable_mlock = true

# unseal-init reaches the API on 127.0.0.1:8200 inside the pod. TLS is off to keep the example
# short; in production mount a certificate, set tls_cert_file/tls_key_file here, use https in
# unseal-init's vault.address and point vault.caCert at the CA.
listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = true
}

# Raft: node id, API and cluster addresses come from VAULT_RAFT_NODE_ID, VAULT_API_ADDR and
# VAULT_CLUSTER_ADDR (BAO_* for OpenBao), set per pod in the StatefulSet.
storage "raft" {
  path = "/data/raft"
}
