"""Configs: the YAML files every stage reads, and the light machinery every room shares.

    from pico.configs.tree import load_config
    cfg = load_config("quickstart", ["--optim.lr=3e-4"])   # a name here or a path

    *.yaml      quickstart, pico-125m, pico-1b, learned (the MoD router) and the baselines (vanilla, spacebyte)
    errors.py   UserError (bad input: the CLI prints it without a traceback) and ConfigError
    tree.py     the config tree: one dataclass per component, Config, from_dict, dotted overrides,
                load_config / save_config, field_docs (help text from field docstrings), describe_config

Nothing here imports torch, the trainer or a cluster client, so data_prep/, pipeline/ and
cluster/ all import it (it imports only `pico.model.config` for ModelConfig).
"""
