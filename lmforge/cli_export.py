"""``lmforge export`` and ``lmforge verify``: checkpoint -> verified Hugging Face folder (-> Hub)."""
from __future__ import annotations

import json


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a ZeRO checkpoint to a verified Hugging Face folder (and push it)",
                       description="Consolidate a DeepSpeed ZeRO checkpoint (stages 0-3, any world size) tensor by "
                                   "tensor into safetensors, write config, tokenizer and model card, verify the folder "
                                   "in a fresh process against the checkpoint's probe logits, optionally push it.")
    p.add_argument("checkpoint", help="checkpoint folder (RUN/checkpoints/step_XXXXXXXX), or a run folder (its newest checkpoint)")
    p.add_argument("output", help="export folder to create")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the exported weights (default fp32: the master weights as trained)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB; KB/MB/GB/TB are powers of 10)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--no-verify", action="store_true", help="skip the fresh-process reload and logits check (not for releases)")
    ev = p.add_argument_group("release evaluation (lm-evaluation-harness; pip install 'lmforge[eval]')")
    ev.add_argument("--eval-tasks", default="", help="comma-separated harness tasks run on the verified folder; results go into "
                                                  "the card's model-index")
    ev.add_argument("--eval-limit", type=int, default=None, help="documents per task (default: all)")
    ev.add_argument("--eval-include-path", default=None, help="a folder of local task YAMLs")
    card = p.add_argument_group("model card")
    card.add_argument("--license", default="other", help="Hub license id (default other)")
    card.add_argument("--language", nargs="+", default=["en"], help="ISO 639-1 codes of the training text (default en)")
    card.add_argument("--dataset", nargs="+", default=[], help="Hub dataset ids of the training data (default: the data folder's name)")
    card.add_argument("--model-name", default="", help="name in the card and model-index (default: repo id or folder name)")
    hub = p.add_argument_group("push to the Hugging Face Hub (token: HF_TOKEN or huggingface-cli login; endpoint: HF_ENDPOINT)")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="push the verified folder to this repository")
    hub.add_argument("--private", action="store_true", help="create the repository private")
    hub.add_argument("--revision", default="", help="branch to push to; {step} becomes the checkpoint's step (default main)")
    hub.add_argument("--commit-message", default="", help="commit message (default: 'lmforge export of <tag> (step N)')")
    p.set_defaults(handler=_export)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="run lm-evaluation-harness tasks on an exported causal LM folder",
                       description="Score an exported folder with EleutherAI's lm-evaluation-harness (its Hugging Face "
                                   "backend). Local tasks: a folder of task YAMLs given with --include-path. Needs the "
                                   "eval extra (pip install 'lmforge[eval]').")
    p.add_argument("hf_dir", help="an exported model folder (lmforge export OUT)")
    p.add_argument("--tasks", required=True, help="comma-separated harness task or group names")
    p.add_argument("--limit", type=int, default=None, help="score at most N documents per task (default: all)")
    p.add_argument("--include-path", default=None, help="a folder of extra task YAMLs; relative data_files are resolved against it")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; cuda for a GPU)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON to this file")
    p.set_defaults(handler=_eval)


def _tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _eval(args) -> int:
    from lmforge_common import write_json_atomic
    from pretrain.export.harness import evaluate_folder

    result = evaluate_folder(args.hf_dir, _tasks(args.tasks), limit=args.limit, include_path=args.include_path,
                             batch_size=args.batch_size, device=args.device, num_fewshot=args.num_fewshot)
    for task, metrics in sorted(result.tasks.items()):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if not k.endswith("_stderr"))
        print(f"{task}: {shown} ({result.samples.get(task, '?')} documents)")
    if args.json_path:
        write_json_atomic(args.json_path, result.to_json())
    return 0


def _export(args) -> int:
    from pretrain.export.core import ExportOptions, export
    from pretrain.export.hub import PushOptions
    from pretrain.export.model_card import CardOptions

    push = None
    if args.push_to_hub:
        push = PushOptions(repo_id=args.push_to_hub, private=args.private, revision=args.revision,
                           commit_message=args.commit_message)
    card = CardOptions(license=args.license, language=args.language, datasets=args.dataset, model_name=args.model_name,
                       repo_id=args.push_to_hub or "")
    record = export(args.checkpoint, args.output, ExportOptions(dtype=args.dtype, max_shard_size=args.max_shard_size,
                                                               verify=not args.no_verify, overwrite=args.overwrite,
                                                               card=card, push=push, eval_tasks=_tasks(args.eval_tasks),
                                                               eval_limit=args.eval_limit, eval_include_path=args.eval_include_path))
    v = record["verification"]
    status = f"verified: {_logits_summary(v)}" if v else "NOT verified"
    print(f"exported {record['tag']} (step {record['step']}, ZeRO stage {record['zero_stage']}, {record['world_size']} rank(s)) "
          f"to {args.output}: {len(record['weights'])} safetensors file(s), {record['dtype']}; {status}")
    if record.get("pushed"):
        print(f"pushed: {record['pushed']}")
    return 0


def _logits_summary(v: dict) -> str:
    """One line on a verification's logit comparison (``pretrain.export.verify.verify_export``'s result)."""
    if v["max_abs_logit_diff"] is None:
        return "no probe logits compared"
    if v.get("exact"):
        return f"bit-identical logits ({v['precision']}, max |diff| {v['max_abs_logit_diff']:.3g})"
    return (f"logits within {v['max_abs_logit_diff']:.3g} of the trained model's ({v['precision']}; rtol "
            f"{v['tolerance']['rtol']} + atol {v['tolerance']['atol']:.3g}: {v.get('inexact_reason')})")


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="reload an exported folder with transformers, check logits against a probe, run its pipeline")
    p.add_argument("hf_dir")
    p.add_argument("--probe", default=None, help="probe.safetensors of the checkpoint, to compare logits")
    p.add_argument("--prompt", default=None, help="pipeline prompt (default: the start of the probe batch)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(handler=_verify)


def _verify(args) -> int:
    from pretrain.export.verify import verify_export

    result = verify_export(args.hf_dir, args.probe, args.prompt)
    if result["max_abs_logit_diff"] is not None:
        print(f"logits match the trained model's: {_logits_summary(result)}")
    if result["pipeline"] == "fill-mask":
        print(f"--- fill-mask {result['prompt']!r}: " + ", ".join(f"{r['token_str']!r} {r['score']:.3f}" for r in result["fill_mask"]))
    else:
        print(f"--- {result['prompt']}{result['continuation']}\n---")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0
