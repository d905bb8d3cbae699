"""Fetch, check and list the offline assets (models and data sets) in ptune.assets.

    python scripts/assets.py fetch all            # or names: fetch sentiment genre smollm2
    python scripts/assets.py fetch --force spam   # re-download and reconvert
    python scripts/assets.py status               # what is present and verified, with sizes
    python scripts/assets.py verify [names]       # re-hash; exit 1 on any difference
    python scripts/assets.py export-hf smollm2 DIR  # a model as a transformers directory (f32, tokenizer)

The cache is --cache_dir, else $PTUNE_CACHE, else ~/.cache/ptune."""

import argparse
import sys
import time

from ptune import assets


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default=None, help="cache root (default: $PTUNE_CACHE or ~/.cache/ptune)")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="fetch, verify and convert assets")
    fetch.add_argument("names", nargs="*", default=["all"], help="asset or source names, or all")
    fetch.add_argument("--force", action="store_true", help="re-download and reconvert even if present")
    commands.add_parser("status", help="table of assets: state, size, path")
    check = commands.add_parser("verify", help="re-hash installed assets")
    check.add_argument("names", nargs="*", default=["all"])
    export = commands.add_parser("export-hf", help="write a model asset as a transformers directory")
    export.add_argument("name", help="model asset (smollm2, minilm)")
    export.add_argument("out", help="new directory to write; it must not exist or be empty")
    for sub in commands.choices.values():   # accept --cache_dir after the command too
        sub.add_argument("--cache_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        if args.command == "fetch":
            for name in assets.resolve(args.names):
                start = time.perf_counter()
                path = assets.fetch_assets([name], args.cache_dir, force=args.force)[0]
                print(f"{name:18s} {path}  ({time.perf_counter() - start:.1f} s)")
        elif args.command == "status":
            rows = assets.status(args.cache_dir)
            print(f"cache: {assets.cache_root(args.cache_dir)}")
            print(f"{'asset':18s} {'kind':5s} {'state':9s} {'size':>10s}  source")
            for r in rows:
                state = r["state"] if r["state"] in ("verified", "missing") else "BAD"
                print(f"{r['name']:18s} {r['kind']:5s} {state:9s} {_size(r['bytes']):>10s}  {r['source']}")
            bad = [r for r in rows if r["state"] not in ("verified", "missing")]
            for r in bad:
                print(f"{r['name']}: {r['state']}", file=sys.stderr)
            return 1 if bad else 0
        elif args.command == "export-hf":
            out = assets.export_hf(args.name, args.out, args.cache_dir)
            source = assets.path(args.name, args.cache_dir)
            if source.is_dir():
                print(f"{args.name} already is a transformers directory, {source}; copied to:")
            print(out)
        else:
            failed = 0
            for name in assets.resolve(args.names):
                try:
                    print(f"{name:18s} ok  {assets.verify(name, args.cache_dir)}")
                except assets.AssetError as e:
                    failed += 1
                    print(f"{name:18s} FAILED  {e}", file=sys.stderr)
            return 1 if failed else 0
    except ValueError as e:   # AssetError, or export-hf's refusal of an occupied directory
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
