"""sam3d beside MONAI Label's own deepgrow_3d on real scans: each served by `monailabel start_server`, trained
through `POST /train/<model>` for the same wall-clock budget, then clicked through `POST /infer/<model>` by one
simulated radiologist.

    .venv/bin/python scripts/compare_real_scans.py /work/data/splits/ct_train /work/data/splits/ct_test \\
        --budget-minutes 30 --out results/compare_ct --sam3d-conf preset=sts_ct,checkpoint=demo

TRAIN_DIR and TEST_DIR are MONAI Label studies folders (images beside labels/final/). For each model, one after
the other (they would share the CPUs), the script:

- builds a studies folder with the training images and their final labels and the test images without theirs
  (the test labels stay aside, for scoring only);
- starts a server: sam3d on a copy of apps/sam3d with --sam3d-conf, deepgrow_3d on a copy of MONAI Label's
  radiology sample app (`--conf models deepgrow_3d`, no pretrained weights: they need the internet);
- trains for --budget-minutes of wall clock, from the POST to the end of the run. sam3d publishes its model only
  at the end of a run, so its run is sized to the budget: --sam3d-steps, or steps derived from a calibration run
  that is timed and then stopped before it publishes (the calibration is not counted). deepgrow_3d publishes its
  best model at the end of every epoch, so it is given many epochs and stopped with DELETE /train/ when the
  budget is spent; it then serves the last model published, if any (checked in the server's log);
- clicks every lesion of the test images (26-connected component of the label) by the CVPR 2025 challenge's
  protocol (lib/training/simulated_user.py protocol_click: the first click at the lesion's deepest voxel, each
  next at the deepest voxel of the largest error, foreground on a miss, background on a leak), each click a
  request with all of the lesion's clicks so far as [i, j, k] voxel indices of the image, as Slicer sends them;
  the returned mask must lie on the image's grid, and is scored there as lib.training.evaluate.lesion_scores
  scores it (Dice, NSD at 5 mm, within the lesion's box grown by the tolerance).

Writes to --out: comparison.md (one row per model: what it was given and what it scored; also printed),
comparison.csv (one row per lesion per model) and logs/<model>.log (each server's log).
"""

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import requests
import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient
from scipy import ndimage
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "apps", "sam3d"))

from evaluate import background_changes  # noqa: E402
from lib.cases import find_cases, strip_extension  # noqa: E402
from lib.training.demo import DEMO_FILE  # noqa: E402
from lib.regions import grown_box  # noqa: E402
from lib.settings import OPTIONS  # noqa: E402
from lib.training.evaluate import NSD_TOLERANCE_MM, dice, dice_auc, surface_dice, worst_drop  # noqa: E402
from lib.training.simulated_user import CONNECTIVITY, protocol_click  # noqa: E402
from local_server import APP, copy_app, start_server, stop_server  # noqa: E402
from simulate_session import header, read_ijk  # noqa: E402

logger = logging.getLogger("compare_real_scans")

MODELS = ("sam3d", "deepgrow_3d")
RADIOLOGY_APP = os.path.join(sys.prefix, "monailabel", "sample-apps", "radiology")
POLL_SECONDS = 2.0
RUNNING = ("SUBMITTED", "RUNNING")
# deepgrow_3d's epochs: more than any budget holds; the budget stops the run.
DEEPGROW_MAX_EPOCHS = 10000
# A calibration run times at least this many sam3d steps over at least this many seconds (the progress is read
# from polls POLL_SECONDS apart). A step's time varies with its session's rounds (one to four decoder passes), so
# a short calibration misjudges the mean and the fitted run overshoots the budget.
CALIBRATION_STEPS, CALIBRATION_SECONDS = 30, 90.0
# Far more steps than a calibration runs: it is stopped once timed.
CALIBRATION_RUN_STEPS = 10**6
SAM3D_PROGRESS = re.compile(r"sam3d training:.*\|\s*(\d+)/\d+ \[")
SAM3D_PARAMETERS = re.compile(r"sam3d \S+: ([\d,]+) trainable of ([\d,]+) parameters")
DEEPGROW_ITERATION = re.compile(r"Epoch: \d+/\d+, Iter: \d+/\d+")
INFER_MODEL_PATH = re.compile(r"Infer model path: (.*)$")

# The radiology app's package is also called `lib`, so its config is read in an interpreter of its own: the
# network, crop and spacing that its deepgrow_3d infer and train tasks are built with.
DESCRIBE_DEEPGROW = """
import json, sys
sys.path.insert(0, sys.argv[1])
from monai.transforms import Spacingd
from lib.configs.deepgrow_3d import Deepgrow3D
config = Deepgrow3D()
config.init("deepgrow_3d", sys.argv[2], {"use_pretrained_model": "false"}, None)
infer, train = config.infer(), config.trainer()
print(json.dumps({
    "network": type(config.network).__name__,
    "parameters": sum(p.numel() for p in config.network.parameters()),
    "infer_spatial_size": list(infer.spatial_size),
    "infer_model_size": list(infer.model_size),
    "infer_spacing": [t.spacing_transform.pixdim.tolist() for t in infer.pre_transforms() if isinstance(t, Spacingd)],
    "train_roi_size": list(train.roi_size),
    "train_model_size": list(train.model_size),
    "max_train_interactions": train.max_train_interactions,
}))
"""

Case = Tuple[str, str, str]  # (id, image path, label path), as lib.cases.find_cases gives them


@dataclass
class Server:
    model: str
    url: str
    app: str
    studies: str
    log: str


@dataclass
class Training:
    seconds: float  # wall clock from POST /train/<model> to the end of the run
    done: str  # what the run got through
    budget_rule: str  # how the run was fitted to the budget
    published: Optional[str]  # the model file the run left, None if none
    ended: float  # time.time() at the end


@dataclass
class Setup:
    crop: str
    input_size: str
    parameters: str
    details: str


# ----------------------------------------------------------------------------------------------- studies


def build_studies(folder: str, train: Sequence[Case], test: Sequence[Case]) -> str:
    """A studies folder: the training images with their final labels, the test images without theirs."""
    studies = os.path.join(folder, "studies")
    final = os.path.join(studies, "labels", "final")
    os.makedirs(final)
    for _, image, label in train:
        # Copies: MONAI Label resolves links, and the real splits' links all lead to files named CT_image.nii.gz.
        shutil.copy(image, studies)
        shutil.copy(label, final)
    for _, image, _ in test:
        shutil.copy(image, studies)  # the test label stays aside, for scoring only
    check_no_test_label(studies, test)
    return studies


def check_no_test_label(studies: str, test: Sequence[Case]) -> None:
    """A test label must never be seen by training: the server trains on every image with a final label."""
    final = os.path.join(studies, "labels", "final")
    leaked = {strip_extension(name) for name in os.listdir(final)} & {case for case, _, _ in test}
    if leaked:
        raise AssertionError(f"test labels in the served studies folder {final}: {sorted(leaked)}")


# ----------------------------------------------------------------------------------------------- training (REST)


def post_train(url: str, model: str, params: Dict) -> float:
    """Starts a run; returns when it was asked for."""
    started = time.time()
    answer = requests.post(f"{url}/train/{model}", json=params, timeout=60)
    if answer.status_code != 200:
        raise RuntimeError(f"POST /train/{model} {params}: {answer.status_code} {answer.text[:2000]}")
    return started


def train_status(url: str) -> Dict:
    answer = requests.get(f"{url}/train/", timeout=60)
    answer.raise_for_status()
    return answer.json()


def stop_training(url: str) -> None:
    requests.delete(f"{url}/train/", timeout=60).raise_for_status()


def wait_for_training(url: str, model: str, deadline: Optional[float] = None) -> bool:
    """Polls GET /train/ until the run ends, or stops it at ``deadline``; returns whether it was stopped."""
    logged = time.time()
    while True:
        status = train_status(url)
        if status["status"] not in RUNNING:
            if status["status"] != "DONE":
                details = "\n".join(status.get("details") or [])
                raise RuntimeError(f"{model} training ended {status['status']}:\n{details[-3000:]}")
            return False
        if deadline is not None and time.time() >= deadline:
            stop_training(url)
            return True
        if time.time() - logged > 60:
            logger.info(f"{model} training: {(status.get('details') or ['(no output yet)'])[-1]}")
            logged = time.time()
        time.sleep(POLL_SECONDS)


def train_stats(url: str, model: str) -> Dict:
    return requests.get(f"{url}/info/", timeout=60).json().get("train_stats", {}).get(model) or {}


def log_matches(path: str, pattern: re.Pattern) -> List[re.Match]:
    with open(path, errors="replace") as f:
        return [m for m in map(pattern.search, f) if m]


# ----------------------------------------------------------------------------------------------- sam3d


class Sam3D:
    name = "sam3d"

    def __init__(self, conf: Dict[str, str], steps: Optional[int], seed: int, options: Dict[str, str]) -> None:
        self.conf = conf
        self.steps = steps
        self.seed = seed
        self.options = options  # more training options, as the trainer reads them from the request's JSON

    def prepare(self, folder: str) -> Tuple[str, List[str]]:
        """A copy of the app (what training publishes stays there) and its --conf arguments."""
        app = copy_app(folder)
        demo = os.path.join(APP, "model", DEMO_FILE)
        if os.path.exists(demo):  # else a server asked for the demo weights would first train them
            os.makedirs(os.path.join(app, "model"), exist_ok=True)
            shutil.copy(demo, os.path.join(app, "model"))
        return app, [arg for name, value in self.conf.items() for arg in ("--conf", name, value)]

    def setup(self, server: Server) -> Setup:
        model = requests.get(f"{server.url}/info/", timeout=60).json()["models"]["sam3d"]
        weights, preset = model["weights"], model["preset"]  # with preset "auto": the values planned at the start
        crop = weights["config"]["crop_size"]
        spacing = preset["spacing"]
        trained, total = log_matches(server.log, SAM3D_PARAMETERS)[0].groups()
        return Setup(
            crop=f"{crop}³ at {'×'.join(f'{s:g}' for s in spacing)} mm",
            input_size=f"1×{crop}³ + clicks",
            parameters=f"{total} ({trained} trained)",
            details=f"backbone {weights['backbone']}, preset {self.conf.get('preset', OPTIONS['preset'].default)} "
                    f"({preset['description']}), starting weights: {weights['state']}; "
                    f"a lesion whose mask reaches a crop's face is followed into more crops (the server's default)"
                    + "".join(f"; training {name} {value}" for name, value in self.options.items()),
        )

    def train(self, server: Server, budget: float) -> Training:
        # val_split 0: every training label trains, as for deepgrow_3d
        options = {**self.options, "val_split": 0.0, "seed": self.seed}
        if self.steps:
            steps, rule = self.steps, f"{self.steps} steps given (--sam3d-steps)"
        else:
            steps, rule = self.calibrated_steps(server, budget, options)
        started = post_train(server.url, self.name, {**options, "steps": steps})
        # Not stopped at the budget: sam3d publishes only at the end of a run.
        wait_for_training(server.url, self.name)
        ended = time.time()
        if ended - started > budget * 1.1:
            logger.warning(f"sam3d trained for {ended - started:.0f} s, more than the {budget:.0f} s budget")
        stats = train_stats(server.url, self.name)
        return Training(ended - started, f"{stats['steps']} steps", rule, stats.get("published"), ended)

    def calibrated_steps(self, server: Server, budget: float, options: Dict) -> Tuple[int, str]:
        """The steps that fit ``budget``: a run on the same data is timed (its start-up, then its steps from its
        progress bar) and stopped before it publishes anything."""
        started = post_train(server.url, self.name, {**options, "steps": CALIBRATION_RUN_STEPS})
        first: Optional[Tuple[float, int]] = None  # (when, steps done) at the first sight of the progress bar
        while True:
            status = train_status(server.url)
            now = time.time()
            if status["status"] not in RUNNING:
                raise RuntimeError(f"sam3d calibration run ended {status['status']}: {status.get('details')}")
            progress = [int(m.group(1)) for m in map(SAM3D_PROGRESS.search, status.get("details") or []) if m]
            if progress and first is None:
                first = (now, progress[-1])
            timed = progress[-1] - first[1] if first else 0
            if (timed >= CALIBRATION_STEPS and now - first[0] >= CALIBRATION_SECONDS) or now - started >= budget:
                break
            time.sleep(POLL_SECONDS)
        stop_training(server.url)
        # The stopped run's resumable state must not carry into the run that is compared.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(server.app, "model", "train_state.pt"))
        if not timed:
            raise RuntimeError(f"sam3d calibration timed no training step within the budget ({budget:.0f} s): "
                               "give --sam3d-steps or a longer --budget-minutes")
        step_seconds = (now - first[0]) / timed
        start_up = first[0] - started - first[1] * step_seconds
        steps = max(1, int((budget - start_up) / step_seconds))
        rule = (f"{steps} steps from a calibration run ({now - started:.0f} s, not counted, nothing published): "
                f"{start_up:.0f} s start-up + {step_seconds:.2f} s/step")
        logger.info(f"sam3d: {rule}")
        return steps, rule

    def served(self, server: Server, training: Training) -> str:
        """What /info/ says served the clicks (the published model is swapped in at the first click after it)."""
        weights = requests.get(f"{server.url}/info/", timeout=60).json()["models"]["sam3d"]["weights"]
        checkpoint = weights.get("checkpoint")
        if training.published and os.path.realpath(checkpoint or "") == os.path.realpath(training.published):
            return f"the published {os.path.basename(checkpoint)} ({weights['meta'].get('steps')} steps)"
        logger.error(f"sam3d served {checkpoint} ({weights['state']}), not the published {training.published}")
        return f"NOT the published model: {checkpoint} ({weights['state']})"


# ----------------------------------------------------------------------------------------------- deepgrow_3d


class Deepgrow3D:
    name = "deepgrow_3d"

    def __init__(self, radiology_app: str) -> None:
        self.radiology_app = radiology_app

    def prepare(self, folder: str) -> Tuple[str, List[str]]:
        """A copy of the radiology app (it writes its model folder) and its --conf arguments."""
        app = os.path.join(folder, "radiology")
        shutil.copytree(self.radiology_app, app, ignore=shutil.ignore_patterns("__pycache__", "model"))
        conf = {"models": "deepgrow_3d", "use_pretrained_model": "false", "sam2": "false"}
        return app, [arg for name, value in conf.items() for arg in ("--conf", name, value)]

    def setup(self, server: Server) -> Setup:
        done = subprocess.run(
            [sys.executable, "-c", DESCRIBE_DEEPGROW, server.app, os.path.join(server.app, "model")],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=300,
        )
        if done.returncode:
            raise RuntimeError(f"reading deepgrow_3d's config failed:\n{done.stderr[-3000:]}")
        c = json.loads(done.stdout.strip().splitlines()[-1])
        spacing = "×".join(f"{s:g}" for s in c["infer_spacing"][0])

        def size(values: Sequence[int]) -> str:
            return "×".join(map(str, values))

        return Setup(
            crop=f"{size(c['infer_spatial_size'])} in-plane, all slices, at {spacing} mm",
            input_size=f"3×{size(c['infer_model_size'])} (resized)",
            parameters=f"{c['parameters']:,} (all trained)",
            details=f"{c['network']}; infer: the image at {spacing} mm, cropped {size(c['infer_spatial_size'])} "
                    f"in-plane around the clicks (all slices), resized to {size(c['infer_model_size'])}, channels "
                    f"image + foreground and background guidance; train: {size(c['train_roi_size'])} around the "
                    f"label at 1 mm, resized to {size(c['train_model_size'])}, up to "
                    f"{c['max_train_interactions']} simulated click rounds per iteration",
        )

    def train(self, server: Server, budget: float) -> Training:
        # val_split 0: every training label trains (as for sam3d), and the best model so far is published at the
        # end of every epoch (with validation, only after validation epochs). MLflow's file store fails to start.
        params = {"max_epochs": DEEPGROW_MAX_EPOCHS, "val_split": 0.0, "tracking": "None"}
        started = post_train(server.url, self.name, params)
        stopped = wait_for_training(server.url, self.name, deadline=started + budget)
        ended = time.time()
        epochs = train_stats(server.url, self.name).get("epoch", 0)
        iterations = len(log_matches(server.log, DEEPGROW_ITERATION))
        published = os.path.join(server.app, "model", f"{self.name}.pt")
        rule = ("stopped with DELETE /train/ when the budget was spent" if stopped
                else f"all {DEEPGROW_MAX_EPOCHS} epochs done within the budget")
        return Training(ended - started, f"{epochs} epochs ({iterations} iterations)", rule,
                        published if os.path.exists(published) else None, ended)

    def served(self, server: Server, training: Training) -> str:
        """The model files the clicks were answered with, from the server's log (MONAI Label loads the model file
        again whenever its mtime changes)."""
        paths = {m.group(1).strip() for m in log_matches(server.log, INFER_MODEL_PATH)}
        if training.published is None:
            if paths != {"None"}:
                logger.error(f"deepgrow_3d published nothing, yet its clicks were answered with {paths}")
            return f"its random initialisation: no model published in the budget (the log's infer model path: {paths})"
        modified = os.stat(training.published).st_mtime
        if {os.path.realpath(p) for p in paths} != {os.path.realpath(training.published)} or modified > training.ended:
            logger.error(f"deepgrow_3d answered with {paths}, not (only) {training.published} as it was at the end "
                         "of training")
            return f"NOT only the published model: {paths}"
        return (f"the published {os.path.basename(training.published)} (best training Dice so far; written "
                f"{training.ended - modified:.0f} s before training ended)")


Entrant = Union[Sam3D, Deepgrow3D]


# ----------------------------------------------------------------------------------------------- the radiologist


def grid(image) -> Tuple[Tuple[float, ...], ...]:
    """The size, spacing, origin and direction of an ITK image or of an image file's header."""
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def same_grid(mask: sitk.Image, image: sitk.ImageFileReader) -> bool:
    return all(len(a) == len(b) and np.allclose(a, b, atol=1e-3) for a, b in zip(grid(mask), grid(image)))


def infer_mask(
    client: MONAILabelClient, model: str, case: str, foreground: List[List[int]], background: List[List[int]],
    image: sitk.ImageFileReader,
) -> Tuple[np.ndarray, float]:
    """One click: POST /infer/<model>?image=<case> with all clicks so far -> the mask as (i, j, k) bool and the
    request's seconds. Both models read clicks as [i, j, k] indices of the array as loaded (sam3d:
    lib/transforms/request_clicks.py; deepgrow_3d: MONAI's AddGuidanceFromPointsd, which follows its transpose)."""
    started = time.time()
    path, _ = client.infer(model, case, {"foreground": foreground, "background": background})
    seconds = time.time() - started
    if not path:
        raise RuntimeError(f"{model} returned no mask for {case}")
    try:
        mask, stored = read_ijk(path)
    finally:
        os.remove(path)
    if not same_grid(stored, image):
        raise RuntimeError(f"{model}'s mask of {case} is not on the image's grid (size, spacing, origin, direction): "
                           f"{grid(stored)}, the image's {grid(image)}")
    return mask > 0, seconds


def click_lesion(
    client: MONAILabelClient, model: str, case: str, image: sitk.ImageFileReader, lesion: np.ndarray, clicks: int
) -> Dict:
    """Clicks one lesion by the challenge's protocol, scoring each mask as lesion_scores does: within the box of
    mask and lesion grown by the NSD tolerance, on the image's grid."""
    spacing = image.GetSpacing()
    margin = int(np.ceil(NSD_TOLERANCE_MM / min(spacing))) + 1
    first, _ = protocol_click(np.zeros_like(lesion), lesion, spacing)
    foreground, background, kind = [first.tolist()], [], "foreground"
    row, correction = {}, None
    for n in range(1, clicks + 1):
        if kind == "none":  # the mask was right: no click, so the same mask and scores
            seconds = math.nan
        else:
            mask, seconds = infer_mask(client, model, case, foreground, background, image)
            box = grown_box(mask, lesion, margin=margin)
            scores = dice(mask[box], lesion[box]), surface_dice(mask[box], lesion[box], spacing, NSD_TOLERANCE_MM)
            correction = protocol_click(mask[box], lesion[box], spacing)
        row[f"dice_{n}"], row[f"nsd_{n}"] = scores
        row[f"click_{n}"], row[f"seconds_{n}"] = kind, seconds
        if correction is None:
            kind = "none"
            continue
        point = (correction[0] + [s.start for s in box]).tolist()
        (foreground if correction[1] else background).append(point)
        kind = "foreground" if correction[1] else "background"
    curve = [row[f"dice_{n}"] for n in range(1, clicks + 1)]
    return {**row, "dice_auc": dice_auc(curve), "worst_drop": worst_drop(curve)}


def click_cases(server: Server, cases: Sequence[Case], clicks: int, workdir: str) -> List[Dict]:
    """Every lesion of every test case, clicked through REST: one row per lesion."""
    client = MONAILabelClient(server.url, tmpdir=workdir)
    rows = []
    for case, image_path, label_path in tqdm(cases, desc=f"{server.model} clicks", unit="case"):
        truth = read_ijk(label_path)[0] > 0
        image = header(image_path)
        if truth.shape != image.GetSize():
            raise RuntimeError(f"{label_path}: {truth.shape} voxels, its image {image.GetSize()}")
        components, count = ndimage.label(truth, structure=CONNECTIVITY)
        for index in range(1, count + 1):
            lesion = components == index
            row = click_lesion(client, server.model, case, image, lesion, clicks)
            rows.append({"model": server.model, "case": case, "lesion": index, "voxels": int(lesion.sum()), **row})
    return rows


# ----------------------------------------------------------------------------------------------- one model


def run_model(
    entrant: Entrant, train: Sequence[Case], test: Sequence[Case], args: argparse.Namespace, workdir: str
) -> Tuple[Dict, List[Dict]]:
    """Serve, train and click one model: (its summary row, its lesion rows)."""
    folder = os.path.join(workdir, entrant.name)
    os.makedirs(folder)
    studies = build_studies(folder, train, test)
    app, conf = entrant.prepare(folder)
    log = os.path.join(args.out, "logs", f"{entrant.name}.log")
    try:
        proc, url = start_server(app, studies, conf, log, start_seconds=900)
    except RuntimeError as e:
        raise RuntimeError(f"the {entrant.name} server (log {log}) did not start: {e}") from None
    server = Server(entrant.name, url, app, studies, log)
    logger.info(f"{entrant.name}: server at {url} (log {log})")
    try:
        setup = entrant.setup(server)
        logger.info(f"{entrant.name}: training for {args.budget_minutes:g} min on {len(train)} cases")
        training = entrant.train(server, args.budget_minutes * 60)
        logger.info(f"{entrant.name}: trained {training.done} in {training.seconds:.0f} s ({training.budget_rule})")
        masks = os.path.join(folder, "masks")
        os.makedirs(masks)
        rows = click_cases(server, test, args.clicks, masks)
        served = entrant.served(server, training)
        check_no_test_label(studies, test)
        if training.published:  # kept for pictures and offline evaluation (scripts/evaluate.py)
            shutil.copy(training.published, os.path.join(args.out, f"{entrant.name}{os.path.splitext(training.published)[1]}"))
    finally:
        stop_server(proc)
    return summary(entrant.name, setup, training, served, rows, args.clicks), rows


def summary(model: str, setup: Setup, training: Training, served: str, rows: List[Dict], clicks: int) -> Dict:
    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    changes = background_changes(rows, clicks)
    seconds = [r[f"seconds_{n}"] for r in rows for n in range(1, clicks + 1) if not math.isnan(r[f"seconds_{n}"])]
    return {
        "model": model,
        "train s": f"{training.seconds:.0f}",
        "trained": training.done,
        "crop": setup.crop,
        "input": setup.input_size,
        "parameters": setup.parameters,
        **{f"Dice@{n}": f"{mean(f'dice_{n}'):.3f}" for n in range(1, clicks + 1)},
        **{f"NSD@{n}": f"{mean(f'nsd_{n}'):.3f}" for n in range(1, clicks + 1)},
        "Dice AUC": f"{mean('dice_auc'):.3f}",
        "worst drop": f"{mean('worst_drop'):.3f}",
        "background clicks: Dice change": f"{np.mean(changes):+.3f} ({len(changes)})" if changes else "- (0)",
        "s/click": f"{np.mean(seconds):.2f}",
        "lesions": len(rows),
        "note": f"{training.budget_rule}; clicks answered by {served}; {setup.details}",
    }


# ----------------------------------------------------------------------------------------------- the record


def markdown(summaries: List[Dict], context: str) -> str:
    columns = [c for c in summaries[0] if c not in ("note", "lesions")]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(s[c]) for c in columns) + " |" for s in summaries]
    notes = [f"- **{s['model']}** (lesions: {s['lesions']}): {s['note']}" for s in summaries]
    return "\n".join([context, "", *lines, "", *notes]) + "\n"


def write_csv(path: str, rows: List[Dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def parse_conf(texts: Optional[List[str]], flag: str = "--sam3d-conf") -> Dict[str, str]:
    """``flag``'s NAME=VALUE lists, e.g. --sam3d-conf preset=sts_ct,checkpoint=demo (repeatable) -> {"preset":
    "sts_ct", "checkpoint": "demo"}."""
    conf = {}
    for item in ",".join(texts or []).split(","):
        if not item.strip():
            continue
        name, equals, value = item.partition("=")
        if not equals:
            raise SystemExit(f"{flag}: {item!r} is not NAME=VALUE")
        conf[name.strip()] = value.strip()
    return conf


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_dir", help="studies folder of the training cases (images, labels/final/)")
    parser.add_argument("test_dir", help="studies folder of the test cases; their labels are only scored against")
    parser.add_argument("--budget-minutes", type=float, required=True, help="wall-clock training time per model")
    parser.add_argument("--out", required=True, help="folder for comparison.md, comparison.csv and logs/")
    parser.add_argument("--sam3d-conf", action="append", metavar="NAME=VALUE[,...]",
                        help="sam3d's --conf, e.g. preset=sts_ct,checkpoint=demo")
    parser.add_argument("--sam3d-train", action="append", metavar="NAME=VALUE[,...]",
                        help="more options of sam3d's POST /train/sam3d, e.g. batch_size=2")
    parser.add_argument("--sam3d-steps", type=int, help="sam3d's training steps (default: fitted to the budget)")
    parser.add_argument("--seed", type=int, default=0, help="sam3d's training seed")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--clicks", type=int, default=5, help="clicks per lesion, each scored")
    parser.add_argument("--limit", type=int, help="use the first N training and test cases only")
    parser.add_argument("--test-limit", type=int, help="use the first N test cases only (default: --limit)")
    parser.add_argument("--radiology-app", default=RADIOLOGY_APP, help="MONAI Label's radiology sample app")
    parser.add_argument("--workdir", help="where the studies folders and app copies go (default: a temporary "
                                          "folder, removed at the end)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        parser.error(f"--models: {unknown or 'none given'}; choose from {', '.join(MODELS)}")
    return args


def machine() -> str:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{os.cpu_count()} CPUs" + (f", GPUs: {', '.join(gpus)}" if gpus else ", no GPU")


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    """Runs the comparison; returns the table's rows (one per model)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("monailabel.client.client").setLevel(logging.WARNING)  # it logs every click's files
    try:
        train = find_cases(args.train_dir)[: args.limit]
        test = find_cases(args.test_dir)[: args.test_limit or args.limit]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    shared = {case for case, _, _ in train} & {case for case, _, _ in test}
    if shared:  # the same id in both: its label would train the model it tests
        raise SystemExit(f"cases in both {args.train_dir} and {args.test_dir}: {sorted(shared)}")
    entrants = {"sam3d": Sam3D(parse_conf(args.sam3d_conf), args.sam3d_steps, args.seed,
                            parse_conf(args.sam3d_train, "--sam3d-train")),
                "deepgrow_3d": Deepgrow3D(args.radiology_app)}
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    summaries, rows = [], []
    workdir = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    with workdir as folder:
        for model in args.models:  # one after the other: both would want all the CPUs
            model_summary, model_rows = run_model(entrants[model], train, test, args, folder)
            summaries.append(model_summary)
            rows += model_rows
    if not rows:
        raise SystemExit(f"no lesion in the labels of {args.test_dir}")
    context = (
        f"Trained on {len(train)} cases of {args.train_dir}, tested on {len(test)} cases of {args.test_dir} "
        f"({len(rows) // len(summaries)} lesions); {args.budget_minutes:g} min of wall-clock training per model on "
        f"this machine ({machine()}), through POST /train/<model>; {args.clicks} clicks per lesion through "
        f"POST /infer/<model> by the CVPR 2025 challenge's protocol; Dice and NSD ({NSD_TOLERANCE_MM:g} mm) on the "
        "image's own grid within the lesion's box grown by the tolerance, mean per lesion; AUC: mean Dice over the "
        "clicks; worst drop: the largest fall of Dice after one click; background clicks: the mean change of Dice "
        "they caused (their number); s/click: wall clock of one request, mask download included."
    )
    table = markdown(summaries, context)
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write(table)
    write_csv(os.path.join(args.out, "comparison.csv"), rows)
    print(table)
    logger.info(f"wrote {args.out}/comparison.md and comparison.csv")
    return summaries


if __name__ == "__main__":
    main()
