# Two commands from a fresh clone: `make train` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test check-readme lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python xlab.py fit
	$(BIN)/python infer.py "$$(ls -td logs/version_*/ | head -1)checkpoints/last.ckpt" "def " --max-new-tokens 120 --seed 0

test: $(STAMP)
	$(BIN)/python -m pytest -q

# every command of README.md, run as written with sizes shrunk (make test runs a representative few): minutes
check-readme: $(STAMP)
	$(BIN)/python -m pytest -q -m "" tests/test_readme_commands.py

lint: $(STAMP)
	$(BIN)/ruff check xlab tests benchmarks *.py

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
