"""An annotation session simulated through a real server: how many clicks the next lesion needs as saved labels
accumulate and the server fine-tunes on them.

    .venv/bin/python scripts/simulate_session.py DATA --out results/session --preset kits --label-value 1 \\
        --backbone tiny --checkpoint CKPT --train-every 4 0 --strategy uncertain random

DATA is an MSD-layout folder (imagesTr/ and labelsTr/) or a MONAI Label studies folder (images beside
labels/final/, e.g. the hard phantoms of scripts/make_demo_studies.py --hard N). For each strategy and each K of
--train-every (one session each, run one after the other) the script starts `monailabel start_server` on a copy
of the app and a fresh studies folder holding the images only, and acts as a radiologist through REST:

- asks for the next sample (/activelearning/{strategy});
- clicks each lesion (26-connected component of the tumour label) by the challenge protocol that
  scripts/evaluate.py follows (lib/training/simulated_user.py protocol_click, here on the image's own grid and
  spacing), one segment per lesion, until the returned mask reaches --target Dice or --max-clicks clicks;
- saves the ground truth's tumour mask as the image's `final` label (what the radiologist ends with);
- every K saved labels, POST /train/sam3d (--train-steps steps on all saved labels, from the model in use) and
  goes on annotating while it trains; the server serves the published model from the next click on. A run that
  falls due while another trains starts with the first label saved after that one ends. With --train-wait it waits for each run instead: the
  simulated radiologist takes a second or two per case where a person takes minutes, so without it a session
  ends before the first run does.

Writes to --out: session.csv (one row per lesion, in the order annotated, each session's rows apart: the clicks
needed, the Dice reached and after each click, the model's seconds, the weights that served the last click and
the training runs finished so far), summary.md (figures computed from session.csv; --lower-targets adds the
clicks needed for lower Dice targets, read off the same clicks) and session.png (clicks needed against cases
annotated, per session). A session's server, studies, app copy and log stay in --out/sessions/<session>/. Rows
are written case by case, so an interrupted run leaves a valid csv; --resume goes on where it stopped (the
studies folder keeps the saved labels, the app copy the published model).
"""

import argparse
import csv
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient
from scipy import ndimage
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "apps", "sam3d"))

from lib.cases import EXTENSIONS, find_cases  # noqa: E402
from lib.training.demo import DEMO_FILE  # noqa: E402
from lib.phantoms import read_lesion_kinds  # noqa: E402
from lib.training.simulated_user import CONNECTIVITY, protocol_click  # noqa: E402
from lib.labels import tumour  # noqa: E402
from lib.training.evaluate import dice  # noqa: E402
from lib.transforms.planning import AUTO, named_label_value  # noqa: E402
from lib.transforms.presets import PRESETS  # noqa: E402
from local_server import copy_app, start_server, stop_server  # noqa: E402

logger = logging.getLogger("simulate_session")

MODEL = "sam3d"
COLUMNS = [
    "session", "strategy", "train_every", "order", "case", "lesion", "kind", "clicks", "reached", "dice",
    "dice_per_click", "model_seconds", "seconds", "weights", "weights_labels", "runs_finished",
]
STRATEGIES = ("uncertain", "random", "first")


def session_name(strategy: str, train_every: int) -> str:
    return f"{strategy}_every{train_every}" if train_every else f"{strategy}_off"


# ----------------------------------------------------------------------------------------------- the radiologist


def read_ijk(path: str) -> Tuple[np.ndarray, sitk.Image]:
    """A 3D image as an (i, j, k) array (the index order of the clicks) and the ITK image."""
    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), image


def header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def write_mask(mask: np.ndarray, image_path: str, path: str) -> None:
    """A uint8 mask given as (i, j, k), on the grid of the image at ``image_path``."""
    geometry = header(image_path)
    out = sitk.GetImageFromArray(mask.transpose(2, 1, 0).astype(np.uint8))
    out.SetOrigin(geometry.GetOrigin())
    out.SetSpacing(geometry.GetSpacing())
    out.SetDirection(geometry.GetDirection())
    sitk.WriteImage(out, path, useCompression=True)


class Radiologist:
    """Clicks, saves and trains through REST; knows the ground truth."""

    def __init__(self, url: str, published: str, args: argparse.Namespace, workdir: str) -> None:
        self.url = url
        self.client = MONAILabelClient(url, tmpdir=workdir)
        self.workdir = workdir
        self.published = os.path.realpath(published)
        self.args = args

    def weights(self) -> Tuple[str, int]:
        """What /info/ says serves now (the model that served the last click: a published one is swapped in only
        at a click): a name and the number of saved labels it was trained on (0: the starting weights)."""
        weights = self.client.info()["models"][MODEL]["weights"]
        if weights["checkpoint"] and os.path.realpath(weights["checkpoint"]) == self.published:
            meta = weights["meta"]
            labels = int(meta.get("train_images", 0)) + int(meta.get("val_images", 0))
            return f"trained on {labels} labels ({meta.get('finished')})", labels
        return f"initial ({weights['state']})", 0

    def click(self, case: str, foreground: List[List[int]], background: List[List[int]]) -> Tuple[np.ndarray, float]:
        params = {"foreground": foreground, "background": background, "preset": self.args.preset}
        path, result = self.client.infer(MODEL, case, params)
        try:
            mask, _ = read_ijk(path)
        finally:
            os.remove(path)
        return mask > 0, float(result["model_seconds"])

    def annotate(self, case: str, lesion: np.ndarray, spacing: Tuple[float, ...]) -> Dict:
        """Clicks one lesion (its own segment) until the target or the cap: the row's figures."""
        prediction = np.zeros_like(lesion)
        foreground, background = [], []
        curve, model_seconds, start = [], 0.0, time.time()
        for _ in range(self.args.max_clicks):
            # Never None here: a mask without error has Dice 1, which ended the loop.
            point, positive = protocol_click(prediction, lesion, spacing)
            (foreground if positive else background).append([int(v) for v in point])
            prediction, seconds = self.click(case, foreground, background)
            model_seconds += seconds
            curve.append(dice(prediction, lesion))
            if curve[-1] >= self.args.target:
                break
        weights, weights_labels = self.weights()
        return {
            "clicks": len(curve),
            "reached": int(curve[-1] >= self.args.target),
            "dice": round(curve[-1], 4),
            "dice_per_click": " ".join(f"{d:.4f}" for d in curve),
            "model_seconds": round(model_seconds, 3),
            "seconds": round(time.time() - start, 2),
            "weights": weights,
            "weights_labels": weights_labels,
        }

    def save_final(self, case: str, truth: np.ndarray, image_path: str) -> None:
        path = os.path.join(self.workdir, f"{case}_final.nii.gz")
        write_mask(truth, image_path, path)
        try:
            self.client.save_label(case, path, tag="final")
        finally:
            os.remove(path)

    def final_labels(self) -> set:
        objects = self.client.datastore()["objects"]
        return {image for image, entry in objects.items() if "final" in (entry.get("labels") or {})}

    def next_sample(self, strategy: str) -> Optional[str]:
        return self.client.next_sample(strategy, {}).get("id")

    def training_runs(self) -> List[Dict]:
        answer = requests.get(f"{self.url}/train/", params={"all": "true"}, timeout=60)
        return answer.json() if answer.status_code == 200 else []  # 404: no run yet

    def start_training(self) -> bool:
        """POST /train/sam3d; False while a run is under way (429)."""
        params = {"steps": self.args.train_steps, "val_split": 0.0}
        if self.args.learning_rate:
            params["learning_rate"] = self.args.learning_rate
        answer = requests.post(f"{self.url}/train/{MODEL}", json=params, timeout=60)
        if answer.status_code == 429:
            return False
        if answer.status_code != 200:
            raise RuntimeError(f"POST /train/{MODEL}: {answer.status_code} {answer.text}")
        return True

    def stop_training(self) -> None:
        requests.delete(f"{self.url}/train/", timeout=60)


# ----------------------------------------------------------------------------------------------- one session


class Trainer:
    """When to train: a run every K saved labels; one that falls due while another trains starts at the first
    label saved after that one ends."""

    def __init__(self, radiologist: Radiologist, every: int, saved: int, finished_before: int, wait: bool) -> None:
        self.radiologist = radiologist
        self.every = every
        self.started_at = saved - saved % every if every else saved  # labels saved when the last run started
        self.finished_before = finished_before  # runs finished in earlier servers of this session (--resume)
        self.wait = wait
        self.failures_logged = set()

    def runs(self) -> List[Dict]:
        return self.radiologist.training_runs() if self.every else []

    def finished(self) -> int:
        runs = self.runs()
        for run in runs:
            if run.get("status") == "ERROR" and run.get("id") not in self.failures_logged:
                self.failures_logged.add(run.get("id"))
                logger.warning(f"training run {run.get('id')} failed: {str(run.get('details'))[-500:]}")
        return self.finished_before + sum(run.get("status") == "DONE" for run in runs)

    def under_way(self) -> bool:
        return any(run.get("status") in ("SUBMITTED", "RUNNING") for run in self.runs())

    def after_save(self, saved: int) -> None:
        if not self.every or saved - self.started_at < self.every:
            return
        if self.radiologist.start_training():
            self.started_at = saved
            if self.wait:
                while self.under_way():
                    time.sleep(1)


def prepare(folder: str, cases: List[Tuple[str, str, str]], demo_from: List[str]) -> None:
    """A copy of the app and a studies folder with the images only; the demo weights that an earlier session
    of this run made are reused (the server would train them again)."""
    app = copy_app(folder)
    studies = os.path.join(folder, "studies")
    os.makedirs(studies)
    for _, image, _ in cases:
        shutil.copy(image, studies)
    os.makedirs(os.path.join(app, "model"), exist_ok=True)
    for source in demo_from:
        if os.path.exists(source):
            shutil.copy(source, os.path.join(app, "model", DEMO_FILE))
            break


def server_conf(args: argparse.Namespace) -> List[str]:
    conf = ["--conf", "preset", args.preset]
    if args.backbone:
        conf += ["--conf", "backbone", args.backbone]
    if args.checkpoint:
        conf += ["--conf", "checkpoint", args.checkpoint]
    for name, value in args.conf or []:
        conf += ["--conf", name, value]
    return conf


def lesion_of(label_path: str, label_value: Optional[int]) -> np.ndarray:
    """The label file's tumour voxels, by the rule training reads them with."""
    return tumour(read_ijk(label_path)[0], label_value)


def run_session(
    args: argparse.Namespace,
    strategy: str,
    every: int,
    cases: List[Tuple[str, str, str]],
    rows: List[Dict],
    writer: "RowWriter",
    demo_from: List[str],
) -> None:
    name = session_name(strategy, every)
    folder = os.path.join(args.out, "sessions", name)
    done = [r for r in rows if r["session"] == name]
    done_cases = list(dict.fromkeys(r["case"] for r in done))
    if not os.path.isdir(folder):  # else --resume
        partial = folder + ".partial"  # renamed when whole: a run stopped while preparing leaves no half session
        shutil.rmtree(partial, ignore_errors=True)
        prepare(partial, cases, demo_from)
        os.rename(partial, folder)
    app, studies = os.path.join(folder, "sam3d"), os.path.join(folder, "studies")
    final = os.path.join(studies, "labels", "final")
    if os.path.isdir(final) and len(os.listdir(final)) >= len(cases):
        logger.info(f"{name}: all {len(cases)} cases done")
        return
    by_id = {case: (image, label) for case, image, label in cases}
    kinds = read_lesion_kinds(args.data)
    label_value = args.label_value or named_label_value(args.preset)
    log_path = os.path.join(folder, f"server-{time.strftime('%Y%m%d-%H%M%S')}.log")
    # MONAI Label starts a scoring run (a process that loads the whole app) at every next-sample request; the
    # session uses no scoring, and those runs would take the CPU from the clicks and the training.
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    proc, url = start_server(app, studies, server_conf(args), log_path, env=env, start_seconds=1800)
    logger.info(f"{name}: server at {url} (log {log_path})")
    try:
        with tempfile.TemporaryDirectory(dir=folder) as workdir:
            radiologist = Radiologist(url, os.path.join(app, "model", "sam3d.pt"), args, workdir)
            labelled = radiologist.final_labels()
            for case in done_cases:  # rows written, label not yet saved when the run stopped
                if case not in labelled:
                    radiologist.save_final(case, lesion_of(by_id[case][1], label_value), by_id[case][0])
            # Cases without a lesion have a label and no row.
            annotated = len(labelled | set(done_cases))
            finished_before = max([int(r["runs_finished"]) for r in done], default=0)
            trainer = Trainer(radiologist, every, annotated, finished_before, args.train_wait)
            progress = tqdm(total=len(cases), initial=annotated, desc=name, unit="case")
            for order in range(annotated + 1, len(cases) + 1):
                case = radiologist.next_sample(strategy)
                if case is None:
                    break
                image_path, label_path = by_id[case]
                truth = lesion_of(label_path, label_value)
                geometry = header(image_path)
                if truth.shape != geometry.GetSize():
                    raise SystemExit(f"{label_path}: {truth.shape} voxels, its image {geometry.GetSize()}")
                spacing = tuple(geometry.GetSpacing())
                components, count = ndimage.label(truth, structure=CONNECTIVITY)
                case_rows = []
                for index in range(1, count + 1):
                    row = radiologist.annotate(case, components == index, spacing)
                    case_rows.append({"session": name, "strategy": strategy, "train_every": every, "order": order,
                                      "case": case, "lesion": index, "kind": kinds.get(case, ""), **row})
                if not count:
                    logger.warning(f"{name}: {case} has no lesion (label value {label_value}); saved as it is")
                runs_finished = trainer.finished()
                for row in case_rows:
                    row["runs_finished"] = runs_finished
                writer.write(case_rows)  # before the label: a resumed run saves the labels of written cases
                radiologist.save_final(case, truth, image_path)
                if order < len(cases):  # a run after the last case would serve no case
                    trainer.after_save(order)
                clicks = [r["clicks"] for r in case_rows]
                progress.set_postfix(clicks=clicks, runs=runs_finished)
                progress.update()
            progress.close()
            if trainer.under_way():
                logger.info(f"{name}: all cases done; the training run under way is stopped")
                radiologist.stop_training()
    finally:
        stop_server(proc)


# ----------------------------------------------------------------------------------------------- the record


class RowWriter:
    """Appends rows to session.csv, flushed to disk case by case."""

    def __init__(self, path: str) -> None:
        new = not os.path.exists(path)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS)
        if new:
            self.writer.writeheader()

    def write(self, rows: List[Dict]) -> None:
        self.writer.writerows(rows)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def read_rows(path: str) -> List[Dict]:
    """session.csv's rows with numbers as numbers; a line cut short by a kill is left out."""
    if not os.path.exists(path):
        return []
    numbers = {"train_every": int, "order": int, "lesion": int, "clicks": int, "reached": int, "dice": float,
               "model_seconds": float, "seconds": float, "weights_labels": int, "runs_finished": int}
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({k: numbers[k](v) if k in numbers else v for k, v in row.items() if k in COLUMNS})
            except (TypeError, ValueError):
                continue
    return [r for r in rows if len(r) == len(COLUMNS)]


def thirds(rows: List[Dict]) -> List[List[Dict]]:
    """The rows of the first, middle and last third of a session's cases, by the order they were annotated."""
    cases = max(r["order"] for r in rows)
    return [[r for r in rows if (r["order"] - 1) * 3 // cases == third] for third in range(3)]


def mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def clicks_to(row: Dict, target: float) -> int:
    """The clicks the lesion needed to reach ``target``, up to the session's own target: its curve ran until
    that was reached (or the cap), so it holds every lower target's first crossing."""
    curve = [float(d) for d in row["dice_per_click"].split()]
    return next((k for k, d in enumerate(curve, 1) if d >= target), len(curve))


def first_click_dice(rows: List[Dict]) -> float:
    return mean(float(r["dice_per_click"].split()[0]) for r in rows)


def session_figures(rows: List[Dict]) -> Dict[str, float]:
    parts = thirds(rows)
    return {
        "cases": len({r["case"] for r in rows}),
        "lesions": len(rows),
        "clicks": mean(r["clicks"] for r in rows),
        "reached": mean(r["reached"] for r in rows),
        "dice": mean(r["dice"] for r in rows),
        "model_seconds": mean(r["model_seconds"] for r in rows),
        "served_by_trained": sum(r["weights_labels"] > 0 for r in rows),
        "runs_finished": max(r["runs_finished"] for r in rows),
        "clicks_thirds": [mean(r["clicks"] for r in part) for part in parts],
        "first_dice_thirds": [first_click_dice(part) for part in parts],
    }


def sessions_of(rows: List[Dict]) -> Dict[str, List[Dict]]:
    return {name: [r for r in rows if r["session"] == name] for name in dict.fromkeys(r["session"] for r in rows)}


def table(header: List[str], lines: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(c) + " |" for c in lines]


def summary(rows: List[Dict], command: str, target: float, max_clicks: int, lower: List[float]) -> str:
    figures = {name: session_figures(chosen) for name, chosen in sessions_of(rows).items()}
    overall = table(
        ["session", "cases", "lesions", "clicks needed (mean)", "reached target", "final Dice", "model s per lesion",
         "lesions served by trained weights", "training runs finished"],
        [[name, str(f["cases"]), str(f["lesions"]), f"{f['clicks']:.2f}", f"{f['reached']:.0%}", f"{f['dice']:.3f}",
          f"{f['model_seconds']:.2f}", str(f["served_by_trained"]), str(f["runs_finished"])]
         for name, f in figures.items()],
    )
    by_third = table(
        ["session", "clicks needed: first third", "middle third", "last third", "Dice after one click: first third",
         "middle third", "last third"],
        [[name, *(f"{c:.2f}" for c in f["clicks_thirds"]), *(f"{d:.3f}" for d in f["first_dice_thirds"])]
         for name, f in figures.items()],
    )
    lower_rows = []
    for name, chosen in sessions_of(rows).items():
        for t in sorted(lower, reverse=True):
            lower_rows.append([name, f"{t}", *(f"{mean(clicks_to(r, t) for r in part):.2f}" for part in thirds(chosen))])
    comparisons = []
    for name, f in figures.items():
        strategy, every = name.rsplit("_", 1)
        off = figures.get(f"{strategy}_off")
        if every != "off" and off:
            on_last, off_last = f["clicks_thirds"][2], off["clicks_thirds"][2]
            comparisons.append(f"- {strategy}: the last third needs {on_last:.2f} clicks per lesion training "
                               f"{every.replace('every', 'every ')} labels against {off_last:.2f} with training off: "
                               f"{on_last / off_last:.2f} times as many.")
    lines = [
        "# Simulated annotation session",
        "",
        f"`{command}`",
        "",
        f"Clicks needed per lesion to reach Dice {target} (at most {max_clicks}; a lesion that never reaches it "
        "counts its clicks), by the challenge protocol through the server's REST API; every figure is computed "
        "from session.csv.",
        "",
        *overall,
        "",
        "By the third of the cases (in the order annotated) the lesion belongs to:",
        "",
        *by_third,
    ]
    if lower_rows:
        lines += ["", "Clicks needed for lower targets (from each lesion's Dice after every click):", "",
                  *table(["session", "target", "first third", "middle third", "last third"], lower_rows)]
    if comparisons:
        lines += ["", "Training on against off:", "", *comparisons]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path: str, window: int = 5) -> None:
    """Clicks needed against cases annotated: each case's mean per lesion (dots) and its running mean over
    ``window`` cases (lines); solid: training on, dashed: off; ticks where newly trained weights first served."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {}
    for name, chosen in sessions_of(rows).items():
        strategy = chosen[0]["strategy"]
        colour = colours.setdefault(strategy, f"C{len(colours)}")
        orders = sorted({r["order"] for r in chosen})
        per_case = [mean(r["clicks"] for r in chosen if r["order"] == o) for o in orders]
        running = [np.mean(per_case[max(0, i - window + 1): i + 1]) for i in range(len(per_case))]
        on = chosen[0]["train_every"] > 0
        ax.plot(orders, per_case, ".", color=colour, alpha=0.35)
        ax.plot(orders, running, "-" if on else "--", color=colour, label=name)
        if on:
            served = {}
            for r in chosen:
                served.setdefault(r["weights"], r["order"])
            ticks = [o for w, o in served.items() if not w.startswith("initial")]
            ax.plot(ticks, [0.3] * len(ticks), "|", color=colour, markersize=10,
                    label=f"{name}: newly trained weights first serve")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="cases annotated", ylabel=f"clicks needed per lesion (running mean of {window})", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_record(out: str, command: str, target: float, max_clicks: int, lower: List[float]) -> None:
    rows = read_rows(os.path.join(out, "session.csv"))
    if not rows:
        return
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary(rows, command, target, max_clicks, lower))
    plot(rows, os.path.join(out, "session.png"))


# ----------------------------------------------------------------------------------------------- the command


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="MSD-layout folder (imagesTr/labelsTr) or MONAI Label studies folder")
    parser.add_argument("--out", default="results/session", help="folder for session.csv, summary.md, session.png")
    parser.add_argument("--target", type=float, default=0.9, help="the Dice at which a lesion is done")
    parser.add_argument("--lower-targets", type=float, nargs="*", default=[], metavar="DICE",
                        help="also report the clicks needed for these lower Dice targets (from the same clicks)")
    parser.add_argument("--max-clicks", type=int, default=10, help="the clicks a lesion gets at most")
    parser.add_argument("--train-every", type=int, nargs="+", default=[5, 0], metavar="K",
                        help="train after every K saved labels, 0 = never; one session per value (default: 5 0)")
    parser.add_argument("--train-steps", type=int, default=100, help="steps of each training run")
    parser.add_argument("--learning-rate", type=float, help="of each training run (default: the server's)")
    parser.add_argument("--train-wait", action="store_true", help="pause annotation while a run trains")
    parser.add_argument("--strategy", nargs="+", default=["uncertain"], choices=STRATEGIES,
                        help="next-sample strategies, one session each (default: uncertain)")
    parser.add_argument("--backbone", help="the server's --conf backbone (tiny, vit_b, ...)")
    parser.add_argument("--checkpoint", help="the server's --conf checkpoint (a file, demo or none)")
    parser.add_argument("--conf", nargs=2, action="append", metavar=("NAME", "VALUE"), help="more server --conf")
    parser.add_argument("--preset", default="kits", choices=sorted(PRESETS) + [AUTO],
                        help="the server's and the clicks' preset")
    parser.add_argument("--label-value", type=int, help="the tumour's label value (default: the preset's, else any > 0)")
    parser.add_argument("--limit", type=int, help="the first N cases of DATA only")
    parser.add_argument("--resume", action="store_true", help="go on with the sessions recorded in --out")
    args = parser.parse_args(argv)
    if not 0 < args.target <= 1 or any(not 0 < t < args.target for t in args.lower_targets) or args.max_clicks < 1 or args.train_steps < 1 or min(args.train_every) < 0:
        parser.error("--target in (0, 1], --lower-targets in (0, target), --max-clicks and --train-steps at least 1, --train-every at least 0")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # A kill ends the run as Ctrl-C does: the server and its training stop, the record is written.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("monailabel.client").setLevel(logging.WARNING)  # it logs every request's files
    try:
        cases = find_cases(args.data)[: args.limit]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if len({os.path.basename(image) for _, image, _ in cases}) < len(cases) or any(
            not image.endswith(EXTENSIONS) for _, image, _ in cases):
        raise SystemExit(f"{args.data}: image file names must differ")
    csv_path = os.path.join(args.out, "session.csv")
    if not args.resume and os.path.exists(os.path.join(args.out, "sessions")):
        raise SystemExit(f"{args.out} holds a session already: --resume to go on with it, or another --out")
    os.makedirs(args.out, exist_ok=True)
    rows = read_rows(csv_path)
    if os.path.exists(csv_path):  # rewritten whole: a line cut short by a kill goes
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    command = " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))
    writer = RowWriter(csv_path)
    names = [session_name(s, k) for s in args.strategy for k in args.train_every]
    demo_from = [os.path.join(args.out, "sessions", name, "sam3d", "model", DEMO_FILE) for name in names]
    try:
        for strategy in args.strategy:
            for every in args.train_every:
                run_session(args, strategy, every, cases, rows, writer, demo_from)
    finally:
        writer.close()
        write_record(args.out, command, args.target, args.max_clicks, args.lower_targets)
    logger.info(f"wrote {csv_path}, summary.md and session.png")


if __name__ == "__main__":
    main()
