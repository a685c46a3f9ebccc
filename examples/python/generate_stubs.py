"""Generate Python gRPC stubs for byokd from the repository's proto/ directory.

    python3 examples/python/generate_stubs.py [OUT_DIR]    # default: examples/python/gen/

byokd_example.py calls generate() itself at start-up, so running this is only needed if you
want the stubs on disk (e.g. for an IDE). The output is .gitignored: never edit it.
"""

import importlib.resources
import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"  # <repo>/proto
VAULT_PROTO = "byokd/v1/vault.proto"


def generate(out_dir: pathlib.Path) -> None:
    """Write byokd/v1/vault_pb2.py and vault_pb2_grpc.py under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # vault.proto imports google/protobuf/{timestamp,duration}.proto: grpcio-tools ships them.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main([
        "grpc_tools.protoc",  # argv[0], ignored
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / VAULT_PROTO),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}) on {PROTO_ROOT / VAULT_PROTO}")


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "gen"
    generate(out)
    print(f"stubs written to {out}/byokd/v1/")
