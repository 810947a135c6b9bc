"""Pure: the cluster's objects -> each agent's configuration and each object's status.

mesh.py is the entry point (`compile_mesh`, `Mesh`, `version_of`); the modules
beside it each read one kind of object: services.py (Pods, Services,
EndpointSlices), policies.py (AuthorizationPolicy), peerauth.py
(PeerAuthentication), routes.py (HTTPRoute, GRPCRoute), traffic.py
(TrafficPolicy), upstreams.py (the pod annotation, and the Services a
captured pod reaches), selectors.py, conditions.py and inforce.py (what they
share). Nothing here does I/O or
reads a clock.
"""
