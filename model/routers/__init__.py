"""Routers: which byte positions go through the latent stage. One file per router, behind one protocol.

    base.py       the protocol (Router, Routing, Step, StepRouting), the registry (register,
                  router_class, build_router, validate_config) and what routers share (pack_slots,
                  capped, chunk_lengths, routing_stats)
    spacelike.py  SpaceByte's rule (the shipped default)
    learned.py    Mixture-of-Depths top-k with a calibrated causal threshold
    chunk.py      H-Net's learned chunk boundaries with a ratio loss
    entropy.py    BLT's next-byte entropy from an early head (research option)

`model.router: none` is no router at all (a plain byte Transformer). A new router is one new file
here whose class subclasses `Router` and carries `@register`: importing this package imports every
module in it, so nothing else needs to know the router's name.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
