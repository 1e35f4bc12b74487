"""The online service: HTTP (FastAPI) and gRPC front ends, engines, feature store, metrics, settings.

Layout: settings.py (configuration), schemas.py (request bodies and limits), http_api.py and
grpc_api.py (front ends), state.py (what both front ends share), recommend.py (the use cases both
share), engine/ (the engine processes that run the model: scheduler, continuous batching, their IPC
and the front end's client with admission), features.py (Redis / embedded feature store),
models.py (model lifecycle, hot swap and live catalogue edits), metrics.py, capture.py (traffic
capture), logs.py, server.py (process wiring and shutdown), cli.py (`onerec serve`,
`onerec features load`). The gRPC stubs come from the top-level package onerec_proto.
"""
