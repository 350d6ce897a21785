"""Writes the demo's results into README.md and docs/demo.md from the
committed run in docs/assets/demo/ (made by ``pyreg demo --out
docs/assets/demo``): the blocks between ``<!-- NAME -->`` and ``<!-- /NAME -->``.

    python docs/update_readme.py           # rewrite the block
    python docs/update_readme.py --check   # exit 1 if README.md is out of date
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "assets" / "demo" / "results.json"


def blocks(results_path: Path = RESULTS) -> dict:
    """{file: {block name: text}} from the committed results."""
    from pyreg.demo.report import format_finetune_table, format_table

    data = json.loads(results_path.read_text())
    rows = {(r["task"], r["method"], r["alpha"]): r for r in data["results"]}
    winners = [rows[(w["task"], w["method"], w["alpha"])] for w in data["winners"]]
    cfg = data["config"]
    mlp = format_table([r for r in winners if r["task"] == "mlp"])
    note = (f"<sub>`pyreg demo` (seed {cfg['seed']}, {cfg['device'].upper()}): each method's grid winner "
            f"by validation accuracy; docs/assets/demo/ holds the run.</sub>")
    readme = f"```\n{mlp}\n```\n{note}"
    for c in data.get("compact", []):
        if c["task"] != "mlp":
            continue
        lat = c["latency"].get("cpu")
        speed = (f"; CPU inference of a batch of {c['batch']}: {lat['before_ms']:.3g} ms -> {lat['after_ms']:.3g} ms "
                 f"({lat['speedup']:.2f}x)") if lat else ""
        readme += (f"\n\n`pyreg.compact` then removes the zeroed inputs from the group-lasso winner: "
                   f"{c['num_inputs']} -> {len(c['inputs_kept'])} inputs, {c['params_before']:,} -> "
                   f"{c['params_after']:,} parameters, the same outputs{speed}.")
    return {"README.md": {"demo-winners": readme},
            "docs/demo.md": {"demo-all-winners": f"```\n{format_table(winners)}\n```",
                             "demo-finetune": f"```\n{format_finetune_table(data['finetune'])}\n```"}}


def updated(text: str, name: str, block: str) -> str:
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}\n{end}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    for name, parts in blocks().items():
        path = ROOT / name
        text = path.read_text()
        new = text
        for block, content in parts.items():
            new = updated(new, block, content)
        if new != text:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"{', '.join(stale)}: the demo results differ from docs/assets/demo/results.json; "
              "run python docs/update_readme.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
