"""The KFP layer of alignclip, the only package that imports kfp (the optional extra ``alignclip[kfp]``).

- ``alignclip_kfp.components`` (the folder ``components/``): one KFP component per stage, each a thin shell around
  the `alignclip` CLI; ``components.runtime``: what a task's process does around that CLI call.
- ``alignclip_kfp.pipelines`` (the folder ``pipelines/``): the DAG of every benchmark family, and the composites.
- ``alignclip_kfp.arguments``: resolved settings -> a pipeline's parameters (the one argument builder).
- ``alignclip_kfp.client``: compile, submit (and follow), run locally, dry run: what `alignclip pipeline ...` calls.

components/ and pipelines/ import kfp at module level; the client and the argument builder only inside the
functions that need it, so the settings checks and `--dry-run` work without kfp. The library (``alignclip``) never
imports this package, except lazily in the CLI's `pipeline` commands.
"""
