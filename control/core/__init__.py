"""Pure: the cluster's objects -> each agent's configuration and each object's status."""
