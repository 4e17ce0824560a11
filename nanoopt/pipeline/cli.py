"""The ``nanoopt compress`` and ``nanoopt plot`` commands (kept here, so :mod:`nanoopt.cli` stays small)."""

from __future__ import annotations

import argparse
import sys

from nanoopt.pipeline.recipe import Recipe
from nanoopt.pipeline.runner import run_recipe
from nanoopt.pipeline.schema import RecipeError


def compress_command(args: argparse.Namespace) -> int:
    """Check the recipe (errors go to stderr with exit status 2, before any work), run it, print the report."""
    try:
        recipe = Recipe.from_file(args.recipe)
    except (RecipeError, FileNotFoundError) as error:
        print(f"nanoopt compress: {error}", file=sys.stderr)
        return 2
    result = run_recipe(recipe, output=args.output, progress=args.progress)
    with open(result["files"]["report_md"]) as handle:
        print(handle.read())
    print(f"wrote {', '.join(result['files'].values())}")
    return 0


def plot_command(args: argparse.Namespace) -> int:
    """Draw every plot the report supports; print the PNG paths."""
    try:  # pipeline.plot needs the optional extra matplotlib when imported
        from nanoopt.pipeline.plot import plot_report
    except ImportError as error:  # matplotlib missing
        print(f"nanoopt plot: {error}", file=sys.stderr)
        return 2
    try:
        paths = plot_report(args.report, args.output)
    except (FileNotFoundError, ValueError) as error:   # no such file, not JSON, not a report
        print(f"nanoopt plot: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
