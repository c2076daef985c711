"""Prints the YAML documents of the files named on the command line as one JSON object,
{"path": [document, ...]}, for tests/deploy.rs (the crate has no YAML parser). Run with
the PyYAML of target/deploy-venv, the library kubernetes-validate reads manifests with."""

import json
import sys

import yaml

documents = {}
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        documents[path] = [d for d in yaml.safe_load_all(f) if d is not None]
json.dump(documents, sys.stdout)
