"""Fault injection for training: SIGKILL the training binary at random moments, restart it with
the same command each time, and check that the run still finishes with a good model.

    python tools/fault_inject_training.py --output=fault_injection.json

Trains the ``tiny`` config on the embedded 8x8 digits (by default 4 epochs of 50 steps,
checkpoints every 5 steps) and kills ``train.train_comdefend`` 20 times (seeded), at moments
spread over the whole run:

* ``startup``: a random delay after launch, before the process trained a step;
* ``mid_epoch``: when the trainer's ``progress.json`` reaches a random global step;
* ``checkpoint``: while a checkpoint is being written (the moment TensorFlow's temporary
  ``ckpt-N_temp`` folder appears in ``MODEL_DIR/backup``; when the write is too quick to catch,
  right after it, and the table says which);
* ``after_training``: after the last step, before the model file is written (``progress.json``
  says ``evaluating``).

For each kill it records the global step the killed process had reached (``progress.json``,
written after every step, so a process killed while training may have applied one step more:
the table marks those +1; a kill during a checkpoint write had reached that checkpoint's step),
the checkpoint a restart resumes from (the ``checkpoint`` state file) and the step the next
process really resumed from (its ``progress.json``); steps lost = reached - resumed from. Then
it lets the run finish, loads the model, checks every weight is finite and (unless
``--no_reference``) compares the weights with an uninterrupted run of the same command.

Prints a table and a summary; ``--output`` writes them as JSON. About 3-5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("startup", "mid_epoch", "checkpoint", "after_training")
_POLL_SECONDS = 0.001


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to inject.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the kill moments.")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps_per_epoch", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--checkpoint_every_steps", type=int, default=5)
    parser.add_argument("--workdir", default=None,
                        help="Where the runs go (default: a temporary folder, removed after).")
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    parser.add_argument("--no_reference", action="store_true",
                        help="Skip the uninterrupted reference run (weights comparison).")
    parser.add_argument("--timeout", type=float, default=300,
                        help="Seconds any one training process may run.")
    return parser.parse_args(argv)


def train_command(args, model_dir):
    return [sys.executable, "-m", "train.train_comdefend", "--dataset=digits", "--config=tiny",
            "--train_noise_std=1", f"--epochs={args.epochs}",
            f"--steps_per_epoch={args.steps_per_epoch}", f"--batch_size={args.batch_size}",
            f"--checkpoint_every_steps={args.checkpoint_every_steps}", f"--model_dir={model_dir}"]


def read_progress(model_dir):
    """The trainer's ``progress.json`` (None before the first write)."""
    try:
        with open(os.path.join(model_dir, "progress.json")) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def checkpoint_step(model_dir):
    """The step of the checkpoint the ``checkpoint`` state file names (None: no checkpoint)."""
    try:
        with open(os.path.join(model_dir, "backup", "checkpoint")) as handle:
            text = handle.read()
    except OSError:
        return None
    match = re.search(r'^model_checkpoint_path: ".*ckpt-(\d+)"', text, re.MULTILINE)
    return int(match.group(1)) if match else None


def plan_kills(args, rng):
    """``[(phase, target)]`` in run order: ``target`` is a delay in seconds (startup), a global
    step (mid_epoch, checkpoint) or None (after_training)."""
    total = args.epochs * args.steps_per_epoch
    every = args.checkpoint_every_steps
    counts = {"after_training": max(1, args.kills * 3 // 20),
              "startup": max(1, args.kills * 4 // 20),
              "checkpoint": max(1, args.kills * 4 // 20)}
    counts["mid_epoch"] = args.kills - sum(counts.values())
    in_run = ["mid_epoch"] * counts["mid_epoch"] + ["checkpoint"] * counts["checkpoint"]
    # Distinct target steps spread over the run, in increasing order.
    steps = sorted(rng.sample(range(2, total - 1), len(in_run)))
    rng.shuffle(in_run)
    plan = []
    for phase, step in zip(in_run, steps):
        if phase == "checkpoint":
            step = min(total, (step // every + 1) * every)
        plan.append((phase, step))
    # Startup kills go before random in-run kills; the end kills come last.
    for _ in range(counts["startup"]):
        plan.insert(rng.randrange(len(plan) + 1), ("startup", None))
    plan += [("after_training", None)] * counts["after_training"]
    return plan


class Trainer:
    """One process of the training binary; its output goes to ``log_path``."""

    def __init__(self, command, log_path, env):
        self.log = open(log_path, "w")
        self.started = time.time()
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def alive(self):
        return self.process.poll() is None

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def wait(self, timeout):
        code = self.process.wait(timeout=timeout)
        self.log.close()
        return code


def _own_progress(model_dir, trainer):
    """This process's latest ``progress.json`` (None until it wrote one)."""
    progress = read_progress(model_dir)
    if progress is None or progress.get("time", 0) < trainer.started:
        return None
    return progress


def wait_and_kill(trainer, model_dir, phase, target, startup_seconds, rng, deadline):
    """Waits for the planned moment, kills, and returns what was seen (or why not)."""
    backup = os.path.join(model_dir, "backup")
    during_write = None
    while True:
        if not trainer.alive():
            return {"killed": False, "exit_code": trainer.process.returncode}
        if time.time() > deadline:
            trainer.kill()
            return {"killed": False, "exit_code": "timeout"}
        progress = _own_progress(model_dir, trainer)
        if phase == "startup":
            if time.time() - trainer.started >= target * startup_seconds:
                break
            if progress is not None and progress.get("state") == "training" and \
                    progress["step"] > progress.get("resumed_from_step", 0):
                break  # started training sooner than planned: still an early kill
        elif phase == "mid_epoch":
            if progress is not None and progress.get("step", 0) >= target:
                break
        elif phase == "checkpoint":
            names = os.listdir(backup) if os.path.isdir(backup) else []
            if any(name == f"ckpt-{target}_temp" for name in names):
                during_write = True
                break
            if progress is not None and progress.get("step", 0) >= target:
                during_write = False  # the write finished between two looks
                break
        elif phase == "after_training":
            if progress is not None and progress.get("state") in ("evaluating", "done"):
                # A random moment of the evaluate-and-save window (a fraction of a second).
                time.sleep(rng.uniform(0, 0.05))
                break
        time.sleep(_POLL_SECONDS)
    if not trainer.alive():
        return {"killed": False, "exit_code": trainer.wait(1)}
    trainer.kill()
    progress = _own_progress(model_dir, trainer)
    names = sorted(os.listdir(backup)) if os.path.isdir(backup) else []
    return {"killed": True, "progress": progress, "checkpoint_step": checkpoint_step(model_dir),
            "during_write": during_write,
            "partial_files": [name for name in names if "_temp" in name],
            "model_written": os.path.exists(os.path.join(model_dir, "comdefend.keras"))}


def run_experiment(args):
    rng = random.Random(args.seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fault_inject_training_")
    os.makedirs(workdir, exist_ok=True)
    model_dir = os.path.join(workdir, "run")
    shutil.rmtree(model_dir, ignore_errors=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    command = train_command(args, model_dir)
    total = args.epochs * args.steps_per_epoch
    plan = plan_kills(args, rng)
    started = time.time()
    kills, startup_seconds, processes = [], 5.0, 0
    resumed_from = 0  # the step the process being killed resumed from
    for index, (phase, target) in enumerate(plan):
        if phase == "startup":
            target = rng.uniform(0.05, 1.0)  # share of the measured start-up time
        # A process that ends before its planned moment (the evaluate-and-save window after
        # training is short) is not a kill: the next process gets the same plan.
        for attempt in range(3):
            trainer = Trainer(command, os.path.join(workdir, f"process{processes}.log"), env)
            processes += 1
            seen = wait_and_kill(trainer, model_dir, phase, target, startup_seconds, rng,
                                 time.time() + args.timeout)
            if seen["killed"] or seen["exit_code"] != 0:
                break
        record = {"kill": index + 1, "phase": phase, "target": target, "attempts": attempt + 1,
                  **seen}
        progress = seen.get("progress")
        if seen.get("during_write"):
            # Step `target` was applied: its checkpoint was being written.
            record["step_reached"] = target
        elif progress is not None:
            record["step_reached"] = progress["step"]
            resumed_from = progress.get("resumed_from_step", resumed_from)
            record["resumed_from_step"] = resumed_from
            # Start-up time (launch to the first step) for later start-up kills.
            startup_seconds = max(1.0, progress.get("time", 0) - trainer.started)
        else:  # killed before it restored anything: it had done nothing of its own
            record["step_reached"] = checkpoint_step(model_dir) or 0
        record["restart_resumes_from"] = checkpoint_step(model_dir) or 0
        kills.append(record)
        if not seen["killed"]:
            break
    # Let the run finish.
    final = Trainer(command, os.path.join(workdir, "final.log"), env)
    final_code = final.wait(args.timeout)
    final_progress = read_progress(model_dir)
    # The step each restart really resumed from, as the next process that got as far as
    # training reported it (processes killed before that trained nothing and wrote nothing).
    reports = [record.get("resumed_from_step") if record.get("progress") else None
               for record in kills[1:]]
    reports.append(final_progress.get("resumed_from_step") if final_progress else None)
    for index, record in enumerate(kills):
        record["next_resumed_from_step"] = next(
            (value for value in reports[index:] if value is not None), None)
        record["steps_lost"] = max(0, record["step_reached"] - record["restart_resumes_from"])
        # progress.json is written after each step: a process killed while training may have
        # applied one more step than it reported.
        progress = record.get("progress") or {}
        in_flight = (record["killed"] and not record.get("during_write")
                     and progress.get("state") == "training"
                     and progress.get("step", 0) < result_total(args))
        record["steps_lost_bound"] = record["steps_lost"] + int(in_flight)
        record["resumed"] = (record["killed"]
                             and record["next_resumed_from_step"] == record["restart_resumes_from"])
    result = {"kills_planned": len(plan), "kills": kills, "final_exit_code": final_code,
              "final_progress": final_progress, "total_steps": total,
              "command": " ".join(command[1:]), "seed": args.seed}
    result.update(verify_model(model_dir))
    if not args.no_reference:
        reference_dir = os.path.join(workdir, "reference")
        shutil.rmtree(reference_dir, ignore_errors=True)
        code = Trainer(train_command(args, reference_dir), os.path.join(workdir, "reference.log"),
                       env).wait(args.timeout)
        result["reference_exit_code"] = code
        if code == 0:
            result["max_abs_weight_difference_vs_uninterrupted"] = compare_models(
                model_dir, reference_dir)
    result["seconds"] = time.time() - started
    result["summary"] = summarise(result)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def result_total(args):
    return args.epochs * args.steps_per_epoch


def verify_model(model_dir):
    """Loads the final model in a fresh process: loadable, finite, verdict and step count."""
    script = ("import json, sys, numpy as np\n"
              "from comdefend_tf.model import load_comdefend\n"
              "model = load_comdefend(sys.argv[1])\n"
              "finite = all(bool(np.all(np.isfinite(np.asarray(v)))) for v in model.variables)\n"
              "metrics = json.load(open(sys.argv[1] + '/metrics.json'))\n"
              "print(json.dumps({'model_loads': True, 'weights_finite': finite,\n"
              "                  'verdict': metrics.get('verdict'), 'steps': metrics.get('steps'),\n"
              "                  'psnr_db': metrics['held_out']['psnr_db']}))\n")
    result = subprocess.run([sys.executable, "-c", script, model_dir], cwd=REPO_ROOT,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        return {"model_loads": False, "load_error": result.stderr[-500:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_models(model_dir, reference_dir):
    script = ("import sys, numpy as np\n"
              "from comdefend_tf.model import load_comdefend\n"
              "a, b = load_comdefend(sys.argv[1]), load_comdefend(sys.argv[2])\n"
              "print(max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))\n"
              "          for x, y in zip(a.trainable_variables, b.trainable_variables)))\n")
    result = subprocess.run([sys.executable, "-c", script, model_dir, reference_dir],
                            cwd=REPO_ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                            capture_output=True, text=True, timeout=300)
    return float(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else None


def summarise(result):
    kills = [record for record in result["kills"] if record["killed"]]
    finished = (result["final_exit_code"] == 0 and result.get("model_loads")
                and result.get("weights_finite") and result.get("verdict") == "ok"
                and result.get("steps") == result["total_steps"])
    return {
        "kills_injected": len(kills),
        "kills_resumed": sum(record["resumed"] for record in kills),
        "run_finished": bool(finished),
        "kills_resumed_and_finished": sum(record["resumed"] for record in kills) if finished
        else 0,
        "most_steps_lost": max((record["steps_lost"] for record in kills), default=0),
        "most_steps_lost_bound": max((record["steps_lost_bound"] for record in kills),
                                     default=0),
        "checkpoint_kills_during_write": sum(record.get("during_write") is True
                                             for record in kills),
        "by_phase": {phase: sum(record["phase"] == phase for record in kills)
                     for phase in PHASES},
        "seconds": round(result["seconds"], 1),
    }


def print_table(result):
    print(f"Command: {result['command']}  ({result['total_steps']} steps)")
    print(f"{'kill':>4}  {'phase':<15}{'target':>7}  {'reached':>7}  {'ckpt':>5}  "
          f"{'resumed':>7}  {'lost':>4}  notes")
    for record in result["kills"]:
        target = record["target"]
        target = f"{target:.2f}" if isinstance(target, float) else str(target or "-")
        notes = []
        if not record["killed"]:
            notes.append(f"not killed: exit {record.get('exit_code')}")
        if record.get("during_write"):
            notes.append("killed during the checkpoint write")
        if record.get("partial_files"):
            notes.append("left " + ",".join(record["partial_files"]))
        if record.get("model_written"):
            notes.append("model file already written")
        if record.get("progress") is None and record["killed"]:
            notes.append("before its first progress report")
        print(f"{record['kill']:>4}  {record['phase']:<15}{target:>7}  "
              f"{record['step_reached']:>7}  {record['restart_resumes_from']:>5}  "
              f"{str(record['next_resumed_from_step']):>7}  {record['steps_lost']:>4}"
              f"{'+1' if record['steps_lost_bound'] > record['steps_lost'] else '  '}  "
              + "; ".join(notes))
    summary = result["summary"]
    print(f"Final run: exit {result['final_exit_code']}, model loads: "
          f"{result.get('model_loads')}, weights finite: {result.get('weights_finite')}, "
          f"verdict {result.get('verdict')}, steps {result.get('steps')}, held-out PSNR "
          f"{result.get('psnr_db', float('nan')):.2f} dB")
    if "max_abs_weight_difference_vs_uninterrupted" in result:
        print(f"Max |weight difference| vs an uninterrupted run: "
              f"{result['max_abs_weight_difference_vs_uninterrupted']}")
    print(f"Kills: {summary['kills_injected']} injected, {summary['kills_resumed']} resumed at "
          f"their checkpoint, run finished: {summary['run_finished']}; most steps lost by any "
          f"kill: {summary['most_steps_lost']} (at most {summary['most_steps_lost_bound']} "
          f"counting a step in flight, marked +1); kills during a checkpoint write: "
          f"{summary['checkpoint_kills_during_write']}; {summary['seconds']} s in all")


def main(argv=None):
    args = parse_args(argv)
    if args.kills < 4 or args.epochs * args.steps_per_epoch < 2 * args.kills:
        sys.exit("error: need --kills >= 4 and at least 2 steps per kill")
    result = run_experiment(args)
    print_table(result)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
    return 0 if result["summary"]["run_finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
