"""The lecture's claims as a measured table: every claim beside the paper's figure, what detseg measures, a verdict.

Each claim reads the results.json of the study that measures it (``bench/<study>/results.json``, where
:func:`detseg.bench.run_study` writes by default). A results file is reused when :func:`detseg.bench.stale_reason`
says it still stands for the current code, mode and settings; otherwise the study is run again here (or, with
``reuse_only``, the claim is "not measured", or shown flagged ``stale`` when there are numbers to show). A study that
fails leaves its claims "not measured" and the report goes on; a study this detseg does not have makes its claims
"not measurable here".

Every verdict is a small explicit rule over the study's numbers, its thresholds written into the claim's ``why``;
the rules live in one function per claim below. Outputs: ``claims.json``, ``report.md`` (the table and the details,
with the command that measures each claim), ``report.html`` (one self-contained page: verdict badges, each study's
main figure inline) and ``results.json`` (claims and the state of every study).

This file is longer than most modules: it holds ten-odd claims, each a few lines of reading and a rule.
"""
from __future__ import annotations

import base64
import html
import importlib
import math
from pathlib import Path

from ..io import read_json, write_json, write_text
from ..viz import save_report
from . import STUDIES, mean_std, run_study, stale_reason

HOLDS, FAILS, UNMEASURABLE, UNMEASURED = "holds", "does not hold", "not measurable here", "not measured"
VERDICTS = (HOLDS, FAILS, UNMEASURABLE, UNMEASURED)
UNAVAILABLE = "study not available"
TITLE = "The lecture's claims, measured"

# The studies the claims read, in the order they run.
NEEDED = ("segmentation", "localization", "rcnn", "detectors", "roialign", "densecap", "growth")
# Studies whose results.json records its ``settings`` (so stale_reason compares them); any other study is compared
# by its settings only where its results.json records some.
RECORDS_SETTINGS = ("segmentation", "localization", "rcnn", "detectors", "roialign", "densecap", "growth")
# The rows a study's claims read, where its other rows cost minutes no claim uses: the lecture runs only these
# (the study's --only) and reuses a whole run or a partial one that ran all of them. rcnn: claims 6-7 read R-CNN,
# SPP-net, Fast and Faster R-CNN (not the sliding window, R-FCN or torchvision's model); detectors: claim 8 reads
# Faster R-CNN and the single-shot rows (not the other seven detectors or the sweeps).
PARTS = {"rcnn": ("rcnn", "spp", "fast_rcnn", "faster_rcnn"), "detectors": ("faster_rcnn", "yolo", "ssd")}
# Each study's main figures (in its out dir), embedded in report.html; a study not named here (or whose figures are
# missing) shows the first PNG of its directory.
FIGURES = {"segmentation": ("cost_quality.png", "checkerboard.png"), "localization": ("localization.png",),
           "rcnn": ("speed.png",), "detectors": ("speed_accuracy.png",), "densecap": ("captions.png",),
           "growth": ("growth.png",)}


# What reading an older or partial results.json can raise: the claim is "not measured", with the error.
READ_ERRORS = (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, AttributeError, StopIteration)


class Unmeasured(Exception):
    """A claim's numbers are not in the results (an older or partial run): the claim is "not measured"."""


# ---- numbers and words -------------------------------------------------------------------------------------------
def _number(value, digits: int = 3, suffix: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _times(value) -> str:
    return _number(value, 1, "×")


def _verdict(passed: bool) -> str:
    return HOLDS if passed else FAILS


def _need(value, what: str):
    """``value`` if it is a finite number, else the claim is not measured (``what`` says which number)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise Unmeasured(f"results.json has no usable {what}")
    return float(value)


def _by(rows: list[dict], key: str) -> dict[str, dict]:
    return {row[key]: row for row in rows if isinstance(row, dict) and key in row}


def _seeded(result: dict, key: str) -> str:
    """A median over seeds with its min-max (``per_seed`` lists), or the single number."""
    values = [v for v in ((result.get("per_seed") or {}).get(key) or []) if isinstance(v, (int, float))]
    if len(values) > 1:
        return f"{result[key]:.3f} (median of {len(values)} seeds, {min(values):.3f}–{max(values):.3f})"
    return f"{result[key]:.3f}"


# ---- the claims: each reads one study's results.json and returns measured / verdict / why / numbers ------------
def claim_fcn_cost(results: dict) -> dict:
    rows, ratio = _by(results["rows"], "label"), results["ratios"]
    fcn = rows["FCN full-res"]
    flops, ms = _need(ratio["fcn_over_encdec_flops"], "FLOPs ratio"), _need(ratio["fcn_over_encdec_ms"], "time ratio")
    memory = _need(ratio["fcn_over_encdec_train_memory"], "memory ratio")
    encdec = _default_encdec(results["rows"], fcn, flops)
    gap = _need(fcn["miou"], "FCN mIoU") - _need(encdec["miou"], "encoder-decoder mIoU")
    equal = ratio.get("equal_context") or {}
    measured = (f"FCN / {encdec['label']}: {_times(flops)} FLOPs, {_times(memory)} training memory, "
                f"{_times(ratio.get('fcn_over_encdec_infer_peak'))} inference peak, {_times(ms)} time per image; "
                f"mIoU {fcn['miou']:.3f} vs {encdec['miou']:.3f}")
    if equal.get("flops_ratio") is not None:
        measured += f"; at equal context {_times(equal['flops_ratio'])} FLOPs"
    passed = flops >= 2 and ms >= 2 and memory >= 2 and gap <= 0.05
    why = (f"Holds if FCN's FLOPs, training memory and time are each ≥ 2× the encoder-decoder's and its mIoU is at "
           f"most 0.05 above (here {gap:+.3f}).")
    return {"measured": measured, "verdict": _verdict(passed), "why": why,
            "numbers": {"flops_ratio": flops, "train_memory_ratio": memory, "ms_ratio": ms,
                        "infer_peak_ratio": ratio.get("fcn_over_encdec_infer_peak"), "fcn_miou": fcn["miou"],
                        "encdec_miou": encdec["miou"], "encdec": encdec["label"],
                        "equal_context_flops_ratio": equal.get("flops_ratio")}}


def _default_encdec(rows: list[dict], fcn: dict, flops_ratio: float) -> dict:
    """The encoder-decoder row the study's ratios divide by: the one whose FLOPs times the ratio are FCN's (exact:
    the ratio was computed from them), else the registry default's label."""
    for row in rows:
        if row.get("model") == "seg/encoder_decoder" and isinstance(row.get("gflops_per_image"), (int, float)) \
                and math.isclose(row["gflops_per_image"] * flops_ratio, fcn["gflops_per_image"], rel_tol=1e-6):
            return row
    label = importlib.import_module("detseg.bench.segmentation").default_encdec_label()
    found = _by(rows, "label").get(label)
    if found is None:
        raise Unmeasured(f"no row of the default encoder-decoder ({label})")
    return found


def claim_sliding_window(results: dict) -> dict:
    ratio = results["ratios"]
    flops = _need(ratio["sliding_over_fcn_flops"], "sliding/FCN FLOPs ratio")
    ms = _need(ratio["sliding_over_fcn_ms"], "sliding/FCN time ratio")
    sliding = _by(results["rows"], "label").get("sliding window", {})
    measured = (f"sliding window / FCN: {_number(flops, 0, '×')} FLOPs, {_number(ms, 0, '×')} time per image"
                f" ({_number(sliding.get('gflops_per_image'), 1)} GFLOPs per 128 px image)")
    return {"measured": measured, "verdict": _verdict(flops >= 10 and ms >= 10),
            "why": "Holds if the sliding window costs ≥ 10× the full-resolution FCN in both FLOPs and time "
                   "(an order of magnitude: one crop per pixel, nothing shared).",
            "numbers": {"flops_ratio": flops, "ms_ratio": ms, "sliding_gflops": sliding.get("gflops_per_image")}}


def claim_checkerboard(results: dict) -> dict:
    rows = _by(results["rows"], "label")
    names = {"k3": "enc-dec maxpool + transposed k3", "k4": "enc-dec maxpool + transposed",
             "resize": "enc-dec maxpool + resize_conv"}
    if any(name not in rows for name in names.values()):
        raise Unmeasured("missing rows: " + ", ".join(name for name in names.values() if name not in rows))
    trained = {key: _need(rows[name]["checkerboard_trained"], f"checkerboard of {name}") for key, name in names.items()}
    init = {key: rows[name].get("checkerboard_init") for key, name in names.items()}
    measured = (f"checkerboard score after training (init →): 3×3 {_number(init['k3'])} → {trained['k3']:.3f}, "
                f"4×4 {_number(init['k4'])} → {trained['k4']:.3f}, resize-conv {_number(init['resize'])} → "
                f"{trained['resize']:.3f}")
    passed = trained["k3"] >= 0.1 and trained["k4"] <= trained["k3"] / 2 and trained["resize"] <= trained["k3"] / 2
    return {"measured": measured, "verdict": _verdict(passed),
            "why": "Holds if the 3×3 stride-2 transposed convolution still scores ≥ 0.1 after training (share of "
                   "Nyquist energy on flat input) and the 4×4 kernel and resize-convolution each score at most half "
                   "of it.", "numbers": {"trained": trained, "init": init}}


def claim_unpooling(results: dict) -> dict:
    rows = _by(results["rows"], "label")
    unpool, nearest = rows.get("enc-dec maxpool + max_unpool"), rows.get("enc-dec maxpool + nearest")
    if unpool is None or nearest is None:
        raise Unmeasured("no max-unpooling or nearest row (maxpool encoder-decoder)")
    sharp = _need(unpool.get("boundary_iou"), "boundary IoU of max unpooling (rows older than boundary_iou?)")
    blunt = _need(nearest.get("boundary_iou"), "boundary IoU of nearest unpooling")
    measured = (f"boundary IoU max unpooling {sharp:.3f} vs nearest {blunt:.3f} ({sharp - blunt:+.3f}); "
                f"mIoU {unpool['miou']:.3f} vs {nearest['miou']:.3f}")
    return {"measured": measured, "verdict": _verdict(sharp - blunt >= 0.01),
            "why": "Holds if max unpooling's boundary IoU (IoU of the boundary bands, Cheng et al. 2021) is at "
                   "least 0.01 above nearest unpooling's, both after a max-pool encoder, one run each.",
            "numbers": {"boundary_iou_max_unpool": sharp, "boundary_iou_nearest": blunt,
                        "miou_max_unpool": unpool["miou"], "miou_nearest": nearest["miou"]}}


def claim_fine_tuning(results: dict) -> dict:
    schedules = results["schedules"]
    frozen, joint = schedules["frozen"], schedules["joint"]
    gap = _need(joint["loc_acc"], "joint loc_acc") - _need(frozen["loc_acc"], "frozen loc_acc")
    parts = [f"loc_acc joint {_seeded(joint, 'loc_acc')} vs frozen {_seeded(frozen, 'loc_acc')} (random init)"]
    numbers = {"joint_loc_acc": joint["loc_acc"], "frozen_loc_acc": frozen["loc_acc"], "random_gap": gap}
    passed, missing = gap >= 0.02, ""
    pre_frozen, pre_joint = schedules.get("pretrained_frozen"), schedules.get("pretrained_joint")
    if pre_frozen and pre_joint:
        pre_gap = (_need(pre_joint["loc_acc"], "pretrained joint loc_acc")
                   - _need(pre_frozen["loc_acc"], "pretrained frozen loc_acc"))
        parts.append(f"from the pre-trained backbone joint {_seeded(pre_joint, 'loc_acc')} vs frozen "
                     f"{_seeded(pre_frozen, 'loc_acc')}")
        numbers.update(pretrained_joint_loc_acc=pre_joint["loc_acc"], pretrained_frozen_loc_acc=pre_frozen["loc_acc"],
                       pretrained_gap=pre_gap)
        passed = passed and pre_gap >= 0.02
    else:
        parts.append("pre-trained comparison missing")
        missing = (" The comparison from a backbone pre-trained on scenes classification is missing (no "
                   "pretrained_frozen / pretrained_joint rows), so the verdict covers random init only.")
    weights = sorted(results["box_weights"].values(), key=lambda row: row["knobs"]["box_weight"])
    if len(weights) < 2:
        raise Unmeasured("fewer than two box_weight runs")
    scale = _need(weights[-1]["total_loss"], "total loss") / _need(weights[0]["total_loss"], "total loss")
    best = max(weights, key=lambda row: row["loc_acc"])
    lowest = min(weights, key=lambda row: row["total_loss"])
    parts.append(f"λ {weights[0]['knobs']['box_weight']:g} → {weights[-1]['knobs']['box_weight']:g} scales the "
                 f"total loss {_times(scale)}; best loc_acc at λ={best['knobs']['box_weight']:g} "
                 f"({best['loc_acc']:.3f}), lowest total at λ={lowest['knobs']['box_weight']:g}")
    numbers.update(loss_scale=scale, best_weight=best["knobs"]["box_weight"],
                   lowest_total_weight=lowest["knobs"]["box_weight"])
    return {"measured": "; ".join(parts), "verdict": _verdict(passed and scale >= 2),
            "why": "Holds if joint fine-tuning beats frozen features by ≥ 0.02 loc_acc (from random init and, where "
                   "measured, from the pre-trained backbone) and the total loss changes ≥ 2× across the box_weight "
                   "sweep (so totals cannot rank λ; loc_acc does)." + missing, "numbers": numbers}


# Speed-ups over R-CNN: Fast R-CNN paper (training, R-CNN / SPP-net / Fast R-CNN); lecture (test with proposals,
# R-CNN / Fast / Faster R-CNN).
PAPER_TRAIN = {"spp": 3.4, "fast_rcnn": 8.8}
LECTURE_TEST = {"fast_rcnn": 25.0, "faster_rcnn": 250.0}
SPEEDUP_FACTOR = 3.0    # a measured speed-up "matches" if it is at least the reference's / 3


def claim_rcnn_speedups(results: dict) -> dict:
    at128 = results["speedups"]
    point = results.get("operating_point") or {}
    at_point = point.get("speedups") or {}
    train = {m: _need((at128.get(m) or {}).get("train"), f"{m} training speed-up") for m in PAPER_TRAIN}
    test128 = {m: (at128.get(m) or {}).get("test_with_proposals") for m in LECTURE_TEST}
    test_point = {m: (at_point.get(m) or {}).get("test_with_proposals") for m in LECTURE_TEST}
    use_point = all(isinstance(v, (int, float)) for v in test_point.values())
    test = {m: _need((test_point if use_point else test128)[m], f"{m} test speed-up") for m in LECTURE_TEST}
    regions = [row.get("proposals_per_image") for row in point.get("rows") or [] if row.get("method") == "rcnn"]
    where = (f"the operating point ({_number(regions[0], 0) if regions else '?'} regions per image)" if use_point
             else "128 px (no operating-point timing)")
    measured = (f"train × R-CNN: SPP-net {_times(train['spp'])}, Fast {_times(train['fast_rcnn'])}; test × R-CNN "
                f"at 128 px: Fast {_times(test128['fast_rcnn'])}, Faster {_times(test128['faster_rcnn'])}; at the "
                f"operating point: Fast {_times(test_point['fast_rcnn'])}, Faster {_times(test_point['faster_rcnn'])}")
    ordered = 1 < train["spp"] < train["fast_rcnn"] and 1 < test["fast_rcnn"] < test["faster_rcnn"]
    close = all(train[m] >= PAPER_TRAIN[m] / SPEEDUP_FACTOR for m in train) and \
        all(test[m] >= LECTURE_TEST[m] / SPEEDUP_FACTOR for m in test)
    return {"measured": measured, "verdict": _verdict(ordered and close),
            "why": f"Holds if training speeds up R-CNN < SPP-net < Fast and testing R-CNN < Fast < Faster "
                   f"(at {where}), each speed-up at least 1/{SPEEDUP_FACTOR:g} of the reference's (3.4, 8.8; 25, 250).",
            "numbers": {"train": train, "test_128px": test128, "test_operating_point": test_point,
                        "verdict_basis": "operating_point" if use_point else "128px",
                        "operating_point_regions": regions[0] if regions else None}}


def claim_selective_search(results: dict) -> dict:
    def share(rows) -> tuple[float, float] | None:
        fast = _by(rows or [], "method").get("fast_rcnn") or {}
        if not isinstance(fast.get("test_ms_proposals"), (int, float)) or not fast.get("test_ms_per_image"):
            return None
        return fast["test_ms_proposals"], fast["test_ms_per_image"]

    at128, at_point = share(results["rows"]), share((results.get("operating_point") or {}).get("rows"))
    basis = at_point or at128
    if basis is None:
        raise Unmeasured("no Fast R-CNN row with its proposal time")
    parts = [f"{where}: Selective Search {found[0]:.0f} of {found[1]:.0f} ms ({100 * found[0] / found[1]:.0f}%)"
             for where, found in (("128 px", at128), ("operating point", at_point)) if found]
    fraction = basis[0] / basis[1]
    return {"measured": "Fast R-CNN test time, " + "; ".join(parts), "verdict": _verdict(fraction >= 0.5),
            "why": "Holds if Selective Search is ≥ 50% of Fast R-CNN's test time per image "
                   f"({'at the operating point' if at_point else 'at 128 px'}, proposals computed fresh).",
            "numbers": {"share": fraction, "proposal_ms": basis[0], "total_ms": basis[1],
                        "share_128px": at128 and at128[0] / at128[1],
                        "share_operating_point": at_point and at_point[0] / at_point[1]}}


def _small_ap(row: dict) -> float | None:
    value = row.get("ap_small_scenes")
    return value if isinstance(value, (int, float)) and value >= 0 else None   # -1: no small objects


def claim_single_shot(results: dict) -> dict:
    rows = _by([row for row in results["rows"] if "train_seconds" in row], "method")
    faster = rows.get("faster_rcnn")
    shots = {name: rows[name] for name in ("yolo", "ssd") if name in rows}
    if faster is None or not shots:
        raise Unmeasured("no Faster R-CNN row or no single-shot row")
    parts, numbers, passed, small_missing = [], {}, True, False
    for name, row in shots.items():
        ratio = _need(row["test_ms_per_image"], f"{name} test ms") / _need(faster["test_ms_per_image"], "Faster ms")
        ap, faster_ap = _need(row["ap"], f"{name} AP"), _need(faster["ap"], "Faster R-CNN AP")
        relative = 1 - ap / faster_ap if faster_ap > 0 else 0.0
        small, faster_small = _small_ap(row), _small_ap(faster)
        small_relative = 1 - small / faster_small if small is not None and faster_small else None
        passed = passed and ratio < 1 and ap < faster_ap
        if small_relative is None:
            small_missing = True
        else:
            passed = passed and small_relative >= relative
        parts.append(f"{name}: {_number(ratio, 2, '×')} Faster R-CNN's test time, AP {ap:.3f} vs {faster_ap:.3f}, "
                     f"AP_small {_number(small)} vs {_number(faster_small)}")
        numbers[name] = {"test_ratio": ratio, "ap": row["ap"], "ap_relative_shortfall": relative,
                         "ap_small_scenes": small, "small_relative_shortfall": small_relative}
    numbers["faster_rcnn"] = {"ap": faster["ap"], "ap_small_scenes": _small_ap(faster),
                              "test_ms_per_image": faster["test_ms_per_image"]}
    why = ("Holds if every single-shot detector tests faster than Faster R-CNN, has lower AP, and falls behind on "
           "small objects (AP_small, the scenes' limits) by at least the same fraction as on AP overall.")
    if small_missing:
        why += " AP_small is missing for some detector: the small-object part is not judged for it."
    return {"measured": "; ".join(parts), "verdict": _verdict(passed), "why": why, "numbers": numbers}


def claim_roialign(results: dict) -> dict:
    rows = _by(results["rows"], "name")
    align, pool, faster = rows.get("mask_rcnn_roialign"), rows.get("mask_rcnn_roipool"), rows.get("faster_rcnn")
    if not (align and pool and faster):
        raise Unmeasured("missing one of the mask_rcnn_roialign / mask_rcnn_roipool / faster_rcnn rows")
    mask_gain = _need(align.get("segm_ap"), "RoIAlign mask AP") - _need(pool.get("segm_ap"), "RoIPool mask AP")
    has_kp = isinstance(align.get("kp_ap"), (int, float)) and isinstance(pool.get("kp_ap"), (int, float))
    kp_gain = align["kp_ap"] - pool["kp_ap"] if has_kp else None
    box_change = _need(align.get("ap"), "Mask R-CNN box AP") - _need(faster.get("ap"), "Faster R-CNN box AP")
    measured = (f"mask AP RoIAlign {align['segm_ap']:.3f} vs RoIPool {pool['segm_ap']:.3f} ({100 * mask_gain:+.1f} "
                f"points); keypoint AP {_number(align.get('kp_ap'))} vs {_number(pool.get('kp_ap'))}; box AP "
                f"Mask R-CNN {align['ap']:.3f} vs Faster R-CNN {faster['ap']:.3f}")
    passed = mask_gain >= 0.005 and (kp_gain is None or kp_gain >= 0.005) and box_change >= -0.02
    why = ("Holds if RoIAlign beats RoIPool by ≥ 0.5 AP points on masks and on keypoints, and adding the mask branch "
           "('just another loss') leaves box AP within 0.02 of Faster R-CNN's or above, one run each.")
    if kp_gain is None:
        why += " No keypoint AP in the rows: the keypoint part is not judged."
    return {"measured": measured, "verdict": _verdict(passed), "why": why,
            "numbers": {"mask_ap_gain": mask_gain, "kp_ap_gain": kp_gain, "box_ap_change": box_change,
                        "segm_ap": {"roialign": align["segm_ap"], "roipool": pool["segm_ap"]},
                        "box_ap": {"mask_rcnn": align["ap"], "faster_rcnn": faster["ap"]}}}


def claim_net2net(results: dict) -> dict:
    rows = [row for row in results.get("rows") or [] if isinstance(row, dict)]
    summary = results.get("summary") or {}
    arms = {arm: [row for row in rows if row.get("arm") == arm] for arm in ("grown", "scratch")}
    if not arms["grown"] or not arms["scratch"]:
        raise Unmeasured("no grown or no scratch rows")
    seeds = summary.get("seeds") or len({row.get("seed") for row in arms["grown"]})
    if not isinstance(seeds, int) or seeds < 3:
        raise Unmeasured(f"{seeds} seed(s); the claim needs ≥ 3")

    def stat(arm: str, key: str, name: str):
        mean, std = summary.get(f"{arm}_{name}_mean"), summary.get(f"{arm}_{name}_std")
        values = [row[key] for row in arms[arm] if isinstance(row.get(key), (int, float))]
        if mean is None:
            mean, std = mean_std(values)
        return mean, std, values

    grown_s, grown_s_std, grown_times = stat("grown", "seconds_to_target", "seconds")
    scratch_s, scratch_s_std, scratch_times = stat("scratch", "seconds_to_target", "seconds")
    grown_acc, _, grown_accs = stat("grown", "final_acc", "final")
    scratch_acc, _, scratch_accs = stat("scratch", "final_acc", "final")
    grown_acc, scratch_acc = _need(grown_acc, "grown final accuracy"), _need(scratch_acc, "scratch final accuracy")
    target = summary.get("target_acc")
    if not isinstance(target, (int, float)):
        target = next((row["target_acc"] for row in rows if isinstance(row.get("target_acc"), (int, float))), None)
    speedups = [value for value in summary.get("speedups") or [] if isinstance(value, (int, float))]
    if grown_s is None and scratch_s is None:
        raise Unmeasured("neither the grown nor the scratch runs reached the target accuracy")
    grown_reached = grown_s is not None and len(grown_times) == len(arms["grown"])
    # a scratch network that never reaches the target is slower than any grown one that does
    faster = grown_s is not None and (scratch_s is None or grown_s < scratch_s)
    close = grown_acc >= scratch_acc - 0.01

    def spread(values):
        return f", {min(values):.1f}–{max(values):.1f} s" if len(values) > 1 else ""

    measured = (f"seconds to {_number(target)} accuracy: grown {_number(grown_s, 1)} ± {_number(grown_s_std, 1)} s"
                f"{spread(grown_times)} ({len(grown_times)}/{len(arms['grown'])} seeds reached), scratch "
                f"{_number(scratch_s, 1)} ± {_number(scratch_s_std, 1)} s{spread(scratch_times)} "
                f"({len(scratch_times)}/{len(arms['scratch'])} reached); final accuracy grown {grown_acc:.3f} "
                f"vs scratch {scratch_acc:.3f} over {seeds} seeds")
    if speedups:
        measured += f"; speed-up per seed {min(speedups):.2f}–{max(speedups):.2f}×"
    return {"measured": measured, "verdict": _verdict(grown_reached and faster and close),
            "why": "Holds if every grown seed reaches the target accuracy, the grown network's mean seconds to it "
                   "are below the big network's from scratch (mean ± std over ≥ 3 seeds shown), and its final "
                   "accuracy is at most 0.01 below.",
            "numbers": {"seeds": seeds, "target_acc": target, "grown_seconds_mean": grown_s,
                        "grown_seconds_std": grown_s_std, "scratch_seconds_mean": scratch_s,
                        "scratch_seconds_std": scratch_s_std, "grown_final_mean": grown_acc,
                        "scratch_final_mean": scratch_acc, "grown_final": grown_accs, "scratch_final": scratch_accs,
                        "speedups": speedups}}


def claim_densecap(results: dict) -> dict:
    targets = {"det_map_ratio": 0.8, "attribute_accuracy": 0.8, **(results.get("targets") or {})}
    ratio = _need(results.get("det_map_ratio"), "det_map ratio")
    attributes = _need((results.get("word_accuracy") or {}).get("attributes"), "attribute accuracy")
    greedy = results.get("greedy") or {}
    measured = (f"det_map {_number(greedy.get('det_map'))} vs Faster R-CNN's class-agnostic "
                f"{_number(results.get('faster_rcnn_det_map'))} (ratio {ratio:.2f}); attributes named right "
                f"{attributes:.2f}; densecap_map {_number(greedy.get('densecap_map'))}")
    passed = ratio >= targets["det_map_ratio"] and attributes >= targets["attribute_accuracy"]
    return {"measured": measured, "verdict": _verdict(passed),
            "why": f"Holds if DenseCap's class-agnostic det_map is ≥ {targets['det_map_ratio']:g}× Faster R-CNN's "
                   f"at the same budget and its captions name the region's size, colour and shape right "
                   f"≥ {targets['attribute_accuracy']:.0%} of the time.",
            "numbers": {"det_map_ratio": ratio, "attribute_accuracy": attributes,
                        "densecap_map": greedy.get("densecap_map")}}


CLAIMS = (  # (id, study, the lecture's words, the reference's figure, rule)
    (1, "segmentation", "Semantic segmentation with a fully convolutional network at the image's full resolution is "
     "very expensive; downsample and upsample inside the network instead (encoder–decoder), at similar accuracy.",
     "CS231n lecture 11: 'convolutions at original image resolution will be very expensive'", claim_fcn_cost),
    (2, "segmentation", "Sliding-window segmentation - classify the centre pixel of a crop around every pixel - is "
     "very inefficient: it does not reuse the features shared between overlapping patches.",
     "CS231n lecture 11 (Farabet et al. 2013; Pinheiro & Collobert 2014)", claim_sliding_window),
    (3, "segmentation", "A 3×3 stride-2 transposed convolution overlaps unevenly and leaves checkerboard artifacts; "
     "a 4×4 kernel (size divisible by the stride) or resize-then-convolve gives fewer.",
     "Odena, Dumoulin & Olah, 'Deconvolution and checkerboard artifacts' (Distill 2016)", claim_checkerboard),
    (4, "segmentation", "Max unpooling puts each value back where the max-pool found it, which keeps boundaries "
     "sharper than nearest-neighbour unpooling.",
     "CS231n lecture 11; SegNet (Badrinarayanan et al. 2017): pooling indices improve boundary delineation",
     claim_unpooling),
    (5, "localization", "Classification + localization: fine-tuning the whole network jointly on both losses beats "
     "training heads on frozen features (also from a backbone pre-trained for classification); the multi-task weight "
     "λ changes the loss itself, so compare λ by a performance metric, not by the loss.",
     "CS231n lecture 11: multi-task loss, 'often pretrained on ImageNet (transfer learning)'", claim_fine_tuning),
    (6, "rcnn", "R-CNN → SPP-net → Fast R-CNN → Faster R-CNN: sharing the convolutions and then learning the "
     "proposals make training several times and testing two orders of magnitude faster.",
     "training 1 / 3.4 / 8.8× (R-CNN / SPP-net / Fast; Girshick 2015, VGG16); test 1 / 25 / 250× with proposals "
     "(R-CNN / Fast / Faster; CS231n lecture 11)", claim_rcnn_speedups),
    (7, "rcnn", "Fast R-CNN's test time is dominated by the region proposals (Selective Search).",
     "Girshick 2015: 0.32 s per image without proposals vs 2.3 s with (≈ 86% proposals)", claim_selective_search),
    (8, "detectors", "Single-shot detectors (YOLO, SSD) are much faster but not as accurate as Faster R-CNN, "
     "especially on small objects.",
     "Huang et al., 'Speed/accuracy trade-offs for modern convolutional object detectors' (CVPR 2017)",
     claim_single_shot),
    (9, "roialign", "RoIAlign instead of RoIPool's rounding is what masks and keypoints need; the mask branch is "
     "'just another loss' on Faster R-CNN.",
     "He et al. 2017: about +3 mask AP at stride 16; keypoint AP 64.2 vs 59.8", claim_roialign),
    (10, "growth", "Net2Net: growing a small network mid-training (wider and deeper, function-preserving) reaches the "
     "big network's accuracy in less time than training the big network from scratch.",
     "Chen, Goodfellow & Shlens, 'Net2Net' (ICLR 2016): Net2Wider / Net2Deeper reach the baseline's accuracy faster",
     claim_net2net),
    (11, "densecap", "Dense captioning is detection with a captioner for a classifier: it localizes regions as well "
     "as a detector and describes each in words.",
     "Johnson, Karpathy & Fei-Fei, 'DenseCap' (CVPR 2016)", claim_densecap),
)


# ---- the studies' results --------------------------------------------------------------------------------------
def _settings(study: str, module, quick: bool, results) -> dict | None:
    """The settings stale_reason compares: the study's SETTINGS[quick] where its results.json records settings."""
    table = getattr(module, "SETTINGS", None)
    if not isinstance(table, dict) or quick not in table:
        return None
    if study in RECORDS_SETTINGS or (isinstance(results, dict) and "settings" in results):
        return table[quick]
    return None


def _read(path: Path):
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def gather(study: str, studies_dir: Path, quick: bool, reuse_only: bool) -> dict:
    """A study's state and results: reused / ran / missing / stale / failed, its reason, and the results dict."""
    directory = studies_dir / study
    if study not in STUDIES:
        return {"status": "missing", "reason": UNAVAILABLE, "results": None, "dir": directory}
    try:
        module = importlib.import_module(STUDIES[study])
    except Exception as error:                  # a study whose code is broken must not stop the other claims
        return {"status": "failed", "reason": f"import: {type(error).__name__}: {error}", "results": None,
                "dir": directory}
    results = _read(directory / "results.json")
    reason = stale_reason(results, study, quick, _settings(study, module, quick, results), rows=PARTS.get(study))
    if reason is None:
        return {"status": "reused", "reason": None, "results": results, "dir": directory}
    if reuse_only:
        if not isinstance(results, dict):
            return {"status": "missing", "reason": reason, "results": None, "dir": directory}
        return {"status": "stale", "reason": reason, "results": results, "dir": directory}
    print(f"{study}: running `{command(study, quick)}` ({reason}) ...", flush=True)
    try:
        run_study(study, out=directory, quick=quick, only=part_of(study))
    except Exception as error:                  # one failing study leaves its claims unmeasured, not the report
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}".splitlines()[0], "results": None,
                "dir": directory}
    fresh = _read(directory / "results.json")
    if not isinstance(fresh, dict):
        return {"status": "failed", "reason": "the study wrote no results.json", "results": None, "dir": directory}
    return {"status": "ran", "reason": reason, "results": fresh, "dir": directory}


def part_of(study: str) -> str | None:
    """The study's ``--only`` value where the lecture runs only part of it (None: the whole study)."""
    return ",".join(PARTS[study]) if study in PARTS else None


def command(study: str, quick: bool) -> str:
    """The command that measures a study's claims (the lecture's part of it where it needs only some rows)."""
    only = part_of(study)
    return f"detseg bench {study}" + (" --quick" if quick else "") + (f" --only {only}" if only else "")


def judge(spec: tuple, state: dict, quick: bool) -> dict:
    """One claim's row: the rule's answer on the study's results, or why there is none."""
    claim_id, study, words, reference, rule = spec
    claim = {"id": claim_id, "claim": words, "reference": reference, "measured": "-", "study": study,
             "command": command(study, quick), "verdict": UNMEASURED, "why": "", "stale": None, "numbers": {}}
    if state["results"] is None:
        if state["reason"] == UNAVAILABLE:
            claim.update(verdict=UNMEASURABLE, why=f"Not measurable here: {UNAVAILABLE} in this detseg.")
        else:
            claim.update(verdict=UNMEASURED, why=f"Not measured: the study is {state['status']} ({state['reason']}).")
        return claim
    try:
        claim.update(rule(state["results"]))
    except Unmeasured as error:
        claim.update(verdict=UNMEASURED, why=f"{error}.")
    except READ_ERRORS as error:
        claim.update(verdict=UNMEASURED, why=f"results.json lacks what this claim reads ({type(error).__name__}: "
                                             f"{error}).")
    if state["status"] == "stale":
        claim["stale"] = state["reason"]
    return claim


# ---- reports -----------------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def report_lines(claims: list[dict], studies: dict, quick: bool) -> list[str]:
    counts = {verdict: sum(claim["verdict"] == verdict for claim in claims) for verdict in VERDICTS}
    lines = [
        f"# {TITLE}" + (" (quick)" if quick else ""), "",
        f"Each claim of the lecture beside the paper's figure and what detseg measures on its built-in scenes, with "
        f"a verdict from an explicit rule (its thresholds in the details). {counts[HOLDS]} hold, {counts[FAILS]} do "
        f"not, {counts[UNMEASURED]} not measured, {counts[UNMEASURABLE]} not measurable here. A study's results are "
        "reused while they stand for the current code, mode and settings, else the study is run again; stale numbers "
        "are shown and flagged. Small models, tiny images and short budgets: a claim about ratios transfers, "
        "absolute accuracies do not" + (" - and --quick numbers are a fast look." if quick else "."), "",
        "| # | claim | reference | measured | verdict |", "|---:|---|---|---|---|",
    ]
    for claim in claims:
        verdict = f"**{claim['verdict']}**" + (" (stale)" if claim["stale"] else "")
        lines.append(f"| {claim['id']} | {_cell(claim['claim'])} | {_cell(claim['reference'])} "
                     f"| {_cell(claim['measured'])} | {verdict} |")
    lines += ["", "## Studies", ""]
    lines += [f"- **{name}**: {state['status']}" + (f" ({state['reason']})" if state["reason"] else "")
              for name, state in studies.items()]
    lines += ["", "## Claims", ""]
    for claim in claims:
        lines += [f"### {claim['id']}. {claim['claim']}", "", f"- reference: {claim['reference']}",
                  f"- measured: {claim['measured']}", f"- verdict: **{claim['verdict']}** - {claim['why']}"]
        if claim["stale"]:
            lines.append(f"- stale: {claim['stale']}")
        lines += [f"- study: {claim['study']}; command: `{claim['command']}`", ""]
    return lines


BADGE_COLOURS = {HOLDS: "#1a7f37", FAILS: "#cf222e", UNMEASURED: "#9a6700", UNMEASURABLE: "#6e7781"}
STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#1f2328}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #d0d7de;padding:6px 8px;vertical-align:top;
text-align:left;font-size:14px}th{background:#f6f8fa}.badge{display:inline-block;padding:2px 8px;border-radius:10px;
color:#fff;font-size:13px;white-space:nowrap}.stale{color:#9a6700;font-size:12px}.why{color:#57606a;font-size:13px}
code{background:#f6f8fa;padding:1px 4px}figure{margin:1em 0}img{max-width:100%;border:1px solid #d0d7de}"""


def _figures(study: str, directory: Path) -> list[Path]:
    found = [directory / name for name in FIGURES.get(study, ()) if (directory / name).is_file()]
    return found or sorted(directory.glob("*.png"))[:1]


def report_html(claims: list[dict], studies: dict, quick: bool) -> str:
    escape = html.escape

    def badge(verdict: str) -> str:
        return f'<span class="badge" style="background:{BADGE_COLOURS[verdict]}">{escape(verdict)}</span>'

    title = escape(TITLE + (" (quick)" if quick else ""))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{title}</title>",
             f"<style>{STYLE}</style>", "</head><body>", f"<h1>{title}</h1>",
             "<p>" + escape("Each claim beside the paper's figure and what detseg measures on its built-in scenes; "
                            "the verdict is an explicit rule over the study's numbers (its thresholds under it).")
             + "</p>", "<table><thead><tr><th>#</th><th>claim</th><th>reference</th><th>measured</th>"
             "<th>verdict</th></tr></thead><tbody>"]
    for claim in claims:
        stale = f'<div class="stale">stale: {escape(claim["stale"])}</div>' if claim["stale"] else ""
        parts.append(f"<tr><td>{claim['id']}</td><td>{escape(claim['claim'])}</td><td>{escape(claim['reference'])}"
                     f"</td><td>{escape(claim['measured'])}</td><td>{badge(claim['verdict'])}{stale}"
                     f'<div class="why">{escape(claim["why"])}</div><div><code>{escape(claim["command"])}</code>'
                     "</div></td></tr>")
    parts += ["</tbody></table>", "<h2>Studies</h2>", "<ul>"]
    for name, state in studies.items():
        reason = f" ({escape(state['reason'])})" if state["reason"] else ""
        parts.append(f"<li><b>{escape(name)}</b>: {escape(state['status'])}{reason}</li>")
    parts.append("</ul>")
    for name, state in studies.items():
        if state["status"] not in ("reused", "ran", "stale"):
            continue
        for path in _figures(name, Path(state["dir"])):
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{escape(name)}: "
                         f"{escape(path.name)}\"><figcaption>{escape(name)}: {escape(path.name)}"
                         f"{' (stale)' if state['status'] == 'stale' else ''}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---- the study ---------------------------------------------------------------------------------------------------
def run(out: Path, quick: bool = False, studies_dir: Path | str = Path("bench"), reuse_only: bool = False) -> dict:
    """Gather (reuse or run) every study the claims need, judge the claims, write claims.json, report.md,
    report.html and results.json into ``out``."""
    out, studies_dir = Path(out), Path(studies_dir)
    states = {}
    for study in NEEDED:
        states[study] = gather(study, studies_dir, quick, reuse_only)
        state = states[study]
        print(f"{study}: {state['status']}" + (f" ({state['reason']})" if state["reason"] else ""), flush=True)
    claims = [judge(spec, states[spec[1]], quick) for spec in CLAIMS]
    studies = {name: {"status": state["status"], "reason": state["reason"],
                      "results": str(Path(state["dir"]) / "results.json")} for name, state in states.items()}
    write_json(out / "claims.json", claims)
    save_report(out / "report.md", report_lines(claims, studies, quick))
    write_text(out / "report.html", report_html(claims, states, quick))
    results = {"claims": claims, "studies": studies}
    write_json(out / "results.json", results)
    for claim in claims:
        print(f"{claim['id']:>2}. {claim['verdict']:20s} {claim['measured']}", flush=True)
    return results
