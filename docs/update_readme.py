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
    from pyreg.demo.report import (
        CANCER_COLUMNS,
        DIGITS_COLUMNS,
        format_finetune_table,
        format_strength_table,
        format_table,
        format_target_table,
    )

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
        speed = " (its inference time: `pyreg bench --compact`, [results](bench/README.md#--compact))"
        readme += (f"\n\n`pyreg.compact` then removes the zeroed inputs from the group-lasso winner: "
                   f"{c['num_inputs']} -> {len(c['inputs_kept'])} inputs, {c['params_before']:,} -> "
                   f"{c['params_after']:,} parameters, the same outputs{speed}.")
    study = [r for r in winners if r["task"] in ("mlp", "lstm")]
    cancer = [r for r in data["results"] if r["task"].startswith("cancer")]
    digits = [r for r in data["results"] if r["task"] == "digits"]
    readme += "\n\n" + real_data_sentences(cancer, digits, winners)
    strength = f"```\n{format_strength_table(data['results'])}\n```"
    return {"README.md": {"demo-winners": readme, "demo-strength": strength},
            "docs/demo.md": {"demo-all-winners": f"```\n{format_table(study)}\n```",
                             "demo-finetune": f"```\n{format_finetune_table(data['finetune'])}\n```",
                             "demo-cancer": f"```\n{format_table(cancer, CANCER_COLUMNS)}\n```",
                             "demo-digits": f"```\n{format_table(digits, DIGITS_COLUMNS)}\n```",
                             "demo-strength": strength,
                             "demo-target": "```\n" + format_target_table(
                                 [r for r in digits if r["method"] == "target"]) + "\n```"}}


def real_data_sentences(cancer: list, digits: list, winners: list) -> str:
    """The real-data results in two sentences, from the committed run."""
    def pick(task, methods):
        return [r for r in cancer if r["task"] == task and r["method"] in methods]

    clean = max((r for r in pick("cancer-std", ("group",)) if r["noise_zeroed"] == r["num_noise"]),
                key=lambda r: (r["val_acc"], -r["alpha"]))
    none = pick("cancer-std", ("none",))[0]
    raw = max((r for r in pick("cancer-raw", ("l1", "group")) if 0 < r["inputs_used"] <= 20),
              key=lambda r: (r["val_acc"], -r["alpha"]))
    win = {r["method"]: r for r in winners if r["task"] == "digits"}
    raw_noise = raw["inputs_used"] - raw["informative_kept"]
    target = next(r for r in digits if r["method"] == "target")
    return (f"On scikit-learn's breast cancer set with {clean['num_noise']} noise inputs added (shuffled copies of "
            f"the real features), group lasso on standardized inputs zeroes all {clean['num_noise']} noise inputs "
            f"at alpha {clean['alpha']:g} and keeps {clean['inputs_used']} real features (validation "
            f"{clean['val_acc']:.3f}; no penalty: {none['val_acc']:.3f}); on the raw inputs, whose scales span five "
            f"orders of magnitude, the penalties keep the largest instead: {raw['method'].upper()} at alpha "
            f"{raw['alpha']:g} keeps {raw['inputs_used']} inputs, "
            + ("all" if raw["kept_large_scale"] == raw["inputs_used"] else str(raw["kept_large_scale"]))
            + f" from the larger-scale half and {raw_noise} of them noise."
            f" On the digits, group lasso's winner reads "
            f"{win['group']['inputs_used']} of the 64 pixels (test {win['group']['test_acc']:.3f}), L1's "
            f"{win['l1']['inputs_used']} ({win['l1']['test_acc']:.3f}); `target_sparsity` "
            + " and ".join(f"{t:g}" for t in target["targets"].values()) + " on the first two layers leaves "
            + " and ".join(f"{target['layers'][n]['sparsity']:.1%}" for n in target["targets"])
            + f" of their weights exactly zero (test {target['test_acc']:.3f}).")


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
