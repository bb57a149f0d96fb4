"""The `fastserve` command: one group, one module per job.

fastserve --help
fastserve infer --task sentiment --model models/sst2 --input corpus/ --output out/
"""

from __future__ import annotations

import click

from fastserve.pipeline import __version__
from fastserve.pipeline.errors import UserError


class FastServeGroup(click.Group):
    """Turns a UserError anywhere below into one clear line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.secho(f"error: {e}", err=True, fg="red")
            ctx.exit(e.exit_code)


@click.group(cls=FastServeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastserve")
def cli() -> None:
    """FastServe: language models in bulk. Parquet in, Parquet out, on Dask, MPI and Slurm."""


def _register() -> None:
    from . import demo, infer, report, schedule, status, submit, train

    cli.add_command(infer.infer)
    cli.add_command(status.status)
    cli.add_command(train.train)
    cli.add_command(submit.submit)
    cli.add_command(schedule.schedule)
    cli.add_command(report.report)
    cli.add_command(demo.demo)


_register()


def main() -> None:
    cli()
