"""The injector: adds the agent to pods, as a webhook (`outrider injector serve`) or offline
(`outrider inject`). `core` decides; `webhook`, `app` and `manifests` are its edges."""
