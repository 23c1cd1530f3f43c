"""Scale-out with Ray Serve: an ingress and N engine replicas with stance affinity (the ``[ray]`` extra).

``stanceserve serve --ray --replicas N`` (or ``serve run deploy/ray/serve.yaml``) runs:

* ``Ingress`` (:mod:`app.ray_serve.deployments`): the public HTTP API. It reads each request's body, works out
  its routing key (:mod:`app.ray_serve.routing`: the adapter in ``model``, a blend's heaviest member, a named
  blend's name) and forwards the raw request to a replica through a Ray Serve handle with
  ``multiplexed_model_id=<key>``, so Ray's router sends it to a replica that already holds that stance. A
  request whose replica dies before the first byte of its answer is retried on another replica.
* ``StanceReplica``: one full stanceserve app (:func:`app.main.create_app`: model, engine, slot cache, the
  same routes, errors and SSE) driven in-process over ASGI (:mod:`app.ray_serve.asgi`). Its adapter store is a
  folder shared by every replica; :mod:`app.ray_serve.store_sync` keeps each replica's index in step with it.
* ``MetricsHub``: each replica pushes its Prometheus metrics there; the ingress's ``/metrics`` serves them all,
  labelled ``replica=<id>`` (:mod:`app.ray_serve.metrics_merge`).

Only :mod:`~app.ray_serve.deployments` and :mod:`~app.ray_serve.cluster` import Ray; the other modules are plain
Python (tested without a cluster). Nothing here changes the engine.
"""
