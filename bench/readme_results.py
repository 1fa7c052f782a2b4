"""The README's results tables, regenerated from an evaluation's ``metrics.json``.

    python bench/readme_results.py                      # the default run's evaluation, printed
    python bench/readme_results.py --write README.md    # replace the tables between the markers
    python bench/readme_results.py --metrics runs/evaluate/<key>/metrics.json

Without ``--metrics`` it reads the evaluation of ``pipelines/pork_belly.yaml`` (what
``make run`` made; run that first). ``--write`` replaces what lies between
``<!-- results:begin -->`` and ``<!-- results:end -->`` and nothing else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def default_metrics(config: Path) -> Path:
    """``metrics.json`` of the finished evaluation of ``config`` (the stages' own keys)."""
    from chemmap.config import load_config
    from chemmap.pipeline import run

    out = run(load_config(config), until="evaluate", progress=False, log=lambda s: None)
    return out["evaluate"] / "metrics.json"


def main() -> None:
    from chemmap.evaluate.report import results_markdown

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", type=Path, help="an evaluation's metrics.json")
    ap.add_argument("--config", type=Path, default=ROOT / "pipelines" / "pork_belly.yaml")
    ap.add_argument("--write", type=Path, help="a Markdown file with the results markers")
    args = ap.parse_args()
    path = args.metrics or default_metrics(args.config)
    text = f"<!-- made by: python bench/readme_results.py --write README.md, from {path.parent.name} -->\n"
    text += results_markdown(json.loads(path.read_text()))
    if not args.write:
        print(text)
        return
    doc = args.write.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{args.write}: no {BEGIN} ... {END} markers to write between")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.write.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    print(f"{args.write}: results tables rewritten from {path}")


if __name__ == "__main__":
    main()
