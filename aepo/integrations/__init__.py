"""Drop-ins for other trainers: the AEPO loss inside TRL (:mod:`aepo.integrations.trl`) and
verl (:mod:`aepo.integrations.verl`). Each submodule imports its trainer, so it is imported only
on demand; ``import aepo`` never pulls them in."""
