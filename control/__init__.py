"""The control plane: watches the cluster and streams each agent its configuration.

core/ is pure (objects in, agent configs and object statuses out); the rest
is I/O: list-watch of the Kubernetes API, the gRPC server agents subscribe
to, status write-back and the debug server `outrider proxy-status` reads.
"""

#: The header /debug/agents names its replica in: each replica lists only the agents
#: connected to it, and `outrider proxy-status` and `check` count the replicas they heard.
REPLICA_HEADER = "Outrider-Replica"
