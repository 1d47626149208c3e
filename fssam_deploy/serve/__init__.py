"""FSSAM as a service on Triton Inference Server (PyTriton) with a support-set registry.

`server.serve` / `server.FSSAMServer` run it; `models` holds the three served models; `store` the registry;
`codec` the request checks; `triton_repo` writes a model repository for a full `tritonserver`; `cli` the
`fssam serve` / `fssam client` subcommands (also `python -m fssam_deploy.serve serve|client ...`).
"""
