"""`python -m testbed.experiments.lm_eval_cli ARGS`: lm-eval's own command line, with `--model wdmoe`.

lm-eval 0.4 finds models only in its registry, filled by its own `lm_eval.models` (no plugin
entry points), so its `lm_eval`/`lm-eval` scripts cannot know ours. This registers `wdmoe`
(`testbed.experiments.lm_eval_model`) and runs lm-eval's `cli_evaluate` on the same arguments:

    python -m testbed.experiments.lm_eval_cli --model wdmoe \\
        --model_args shards=DIR,agents=roster.toml,theta=0.2 \\
        --tasks wdmoe_mc_heldout --include_path testbed/tasks --limit 20
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import testbed.experiments.lm_eval_model  # noqa: F401  (registers "wdmoe")

    cli_evaluate()  # reads sys.argv as `lm_eval` would


if __name__ == "__main__":
    main()
