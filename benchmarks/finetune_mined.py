"""Fine-tuning on tuples mined with no label (issue 17.6), measured cross-set, through the CLI.

For each training set (``holidays``: holidays-805, ``paris``: rparis6k-250), exactly the documented
commands (docs/mining.md, "Fine-tuning on mined tuples"):

  cbir mine SET/jpg --out MINED                         # only when MINED/tuples.pkl is missing
  cbir train configs/mined_sfm.yaml data.pkl=MINED/tuples.pkl data.root=SET/jpg \\
      validation.gnd=MINED/val_gnd.pkl validation.images=SET/jpg out=OUT/train-SET
  cbir evaluate --gnd OTHER/gnd.pkl --imsize 512 --scales 1                        # no fine-tuning
  cbir evaluate --gnd OTHER/gnd.pkl --model OUT/train-SET/model.pt --imsize 512 --scales 1   # kept epoch

``cbir mine`` reads the photos only; no label of the training set is read. The kept model is the one
the best-epoch rule chose on the mined val split (whole mined clusters never trained on), the
starting model included; it is measured on the OTHER set. For information only (not a choice: it
was not validated), the last trained epoch is measured too (``OUT/train-SET/last_model.pt``); ``--same-set`` also measures on the mined set itself
(fine-tuning on one's own unlabelled collection: its labels are read only to measure).
Writes OUT/result.json (figures, kept epoch, training history, commands, load average, date).

Example (the figures of docs/mining.md; 2-core CPU, 8-18 min of training a set, loaded; without
--mined-*, each set is mined first into OUT/mined-SET, 5-15 min):
  python benchmarks/finetune_mined.py --out runs/ft_mined --mined-holidays mined-holidays --mined-paris mined-paris --same-set
  python benchmarks/finetune_mined.py --train holidays --out runs/ft_top1 mining.positive=inliers_top1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("CBIR_SHARED", "../shared"))
SETS = {
    "holidays": ("holidays-805", "gnd_holidays805.pkl"),
    "paris": ("rparis6k-250", "gnd_rparis6k_subset250.pkl"),
}
OTHER = {"holidays": "paris", "paris": "holidays"}


def cbir(*args: str, log: Path) -> str:
    """Run ``python -m cbir ARGS`` (this interpreter, inherited PYTHONPATH); stdout returned, stderr to log."""
    cmd = [sys.executable, "-m", "cbir", *args]
    with open(log, "a") as err:
        err.write("$ cbir " + " ".join(args) + "\n")
        err.flush()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): cbir {' '.join(args)} (see {log})")
    return r.stdout


def export_last(run: Path) -> tuple[Path, int]:
    """OUT/last.pt (the last trained epoch) as a model file ``cbir evaluate --model`` reads."""
    from cbir.model import load_model, save_model
    from cbir.training.checkpoint import load_checkpoint

    net = load_model(run / "model.pt")  # the architecture; then the last epoch's weights
    ck = load_checkpoint(run / "last.pt")
    net.load_state_dict(ck["model"])
    save_model(net, run / "last_model.pt")
    return run / "last_model.pt", int(ck["epoch"])


def same_as_start(model_file: Path) -> bool:
    """Whether a saved model holds exactly the weights of the starting model (the config's backbone,
    GeM p=3, offline default weights): the best-epoch rule kept epoch 0."""
    import torch

    from cbir.model import build_model, load_model

    kept = load_model(model_file).state_dict()
    start = build_model(kept_name(model_file), pooling="gem", p=3.0).state_dict()
    return kept.keys() == start.keys() and all(torch.equal(kept[k], start[k]) for k in kept)


def kept_name(model_file: Path) -> str:
    from cbir.model import load_model

    return str(load_model(model_file).config["model"])


def evaluate(gnd: Path, model: Path | None, args, out: Path, log: Path) -> dict:
    js = out.with_suffix(".json")
    if not js.is_file():
        extra = ["--model", str(model)] if model is not None else []
        cbir("evaluate", "--gnd", str(gnd), *extra, "--imsize", str(args.eval_size), "--scales",
             ",".join(str(s) for s in args.eval_scales), "--quiet", "--json", str(js), log=log)
    m = json.loads(js.read_text())["mAP"]
    return {k: (None if m.get(k) is None else round(float(m[k]), 2)) for k in ("easy", "medium", "hard")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", choices=sorted(SETS), nargs="+", default=sorted(SETS))
    ap.add_argument("--config", default="configs/mined_sfm.yaml")
    ap.add_argument("--mined-holidays", help="a `cbir mine` output of holidays-805 (default: OUT/mined-holidays)")
    ap.add_argument("--mined-paris", help="a `cbir mine` output of rparis6k-250 (default: OUT/mined-paris)")
    ap.add_argument("--eval-size", type=int, default=512)
    ap.add_argument("--eval-scales", type=float, nargs="+", default=[1.0])
    ap.add_argument("--no-last", action="store_true", help="do not measure the last trained epoch")
    ap.add_argument("--same-set", action="store_true",
                    help="also measure on the mined set itself (its labels were never read in training)")
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE for cbir train (e.g. optim.epochs=3)")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": {
        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "config": args.config, "overrides": args.overrides, "eval": {"imsize": args.eval_size,
                                                                      "scales": args.eval_scales}, "runs": {}}
    for name in args.train:
        folder, _ = SETS[name]
        images = SHARED / "data" / folder / "jpg"
        mined = Path(getattr(args, f"mined_{name}") or out / f"mined-{name}")
        if not (mined / "tuples.pkl").is_file():
            t = time.time()
            cbir("mine", str(images), "--out", str(mined), "--quiet", log=log)
            result.setdefault("mine_s", {})[name] = round(time.time() - t, 1)
        run = out / f"train-{name}"
        t = time.time()
        if not (run / "train.json").is_file():
            text = cbir("train", args.config, f"data.pkl={mined / 'tuples.pkl'}", f"data.root={images}",
                        f"validation.gnd={mined / 'val_gnd.pkl'}", f"validation.images={images}", f"out={run}",
                        "--no-progress", *args.overrides, log=log)
            (run / "train.json").write_text(text.strip().splitlines()[-1])
        summary = json.loads((run / "train.json").read_text())
        history = json.loads((run / "history.json").read_text()) if (run / "history.json").is_file() else None
        train_s = round(time.time() - t, 1)
        test = OTHER[name]
        tfolder, tgnd = SETS[test]
        gnd = SHARED / "data" / tfolder / tgnd
        r = {"test": test, "mined": str(mined), "kept": summary.get("best"), "epochs_run": summary.get("epochs"),
             "setup": summary.get("setup"), "train_s": train_s, "history": history,
             "none": evaluate(gnd, None, args, out / f"none-on-{test}", log),
             }
        if (summary.get("best") or {}).get("epoch") == 0 and same_as_start(run / "model.pt"):
            r["fine_tuned_kept"] = dict(r["none"], note="epoch 0 kept: the starting weights, not re-measured")
        else:
            r["fine_tuned_kept"] = evaluate(gnd, run / "model.pt", args, out / f"{name}-kept-on-{test}", log)
        same = False
        if not args.no_last:
            last, epoch = export_last(run)
            r["last_epoch"] = epoch
            same = epoch == (summary.get("best") or {}).get("epoch")  # the kept epoch is the last one
            r["fine_tuned_last"] = (dict(r["fine_tuned_kept"], note="the kept epoch") if same
                                    else evaluate(gnd, last, args, out / f"{name}-last-on-{test}", log))
        if args.same_set:
            own = SHARED / "data" / folder / SETS[name][1]
            r["same_set"] = {"none": evaluate(own, None, args, out / f"none-on-{name}", log)}
            r["same_set"]["fine_tuned_kept"] = (dict(r["same_set"]["none"], note=r["fine_tuned_kept"]["note"])
                                                if "note" in r["fine_tuned_kept"] else
                                                evaluate(own, run / "model.pt", args, out / f"{name}-kept-on-{name}", log))
            if not args.no_last:
                r["same_set"]["fine_tuned_last"] = (r["same_set"]["fine_tuned_kept"] if same else
                                                    evaluate(own, last, args, out / f"{name}-last-on-{name}", log))
        result["runs"][name] = r
        print(json.dumps({name: {k: r[k] for k in ("test", "kept", "none", "fine_tuned_kept")}
                          | {k: r[k] for k in ("last_epoch", "fine_tuned_last") if k in r}}), flush=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
