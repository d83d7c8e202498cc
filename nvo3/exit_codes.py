"""Exit codes scripts can rely on (documented in nvo3.cli and the README)."""

EXIT_OK = 0  # success
EXIT_REFUSED = 1  # refused by the system: a typed error, or the checker found differences
EXIT_USAGE = 2  # bad usage or invalid input
EXIT_UNREACHABLE = 3  # NATS, etcd or the NVE did not answer
EXIT_AUTH = 4  # NATS or etcd refused the connection: TLS handshake or credentials
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM
