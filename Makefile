# Fuzzing targets (owned by assurance, see docs/FUZZING.md); the lead owns the other targets.
PYTHON ?= .venv/bin/python
SECONDS ?= 60
FUZZ_WORK ?= /tmp/bulkhead-fuzz

.PHONY: fuzz fuzz-short

# Every fuzz/fuzz_*.py harness for SECONDS seconds each: make fuzz SECONDS=300
fuzz:
	$(PYTHON) fuzz/run_all.py --seconds $(SECONDS) --work $(FUZZ_WORK)

# Every harness for ~10 s (CI).
fuzz-short:
	$(PYTHON) fuzz/run_all.py --seconds 10 --work $(FUZZ_WORK)-short

.PHONY: completion man
# Shell completion and the man page, generated from the argparse tree (bulkhead/clitree.py); install.sh
# installs them. No cost at `bulkhead` start: nothing here runs then.
completion:
	mkdir -p build
	$(PYTHON) -m bulkhead.clitree completion bash > build/bulkhead.bash
	$(PYTHON) -m bulkhead.clitree completion zsh > build/_bulkhead

man:
	mkdir -p build
	$(PYTHON) -m bulkhead.clitree man -o build/bulkhead.1
.PHONY: mutation mutation-sample

# Mutation testing of the pure security core (bench/mutation.py; report in docs/ASSURANCE.md).
mutation:
	nice -n 19 $(PYTHON) bench/mutation.py --write-report

# The fixed-seed per-module sample CI runs (tests/test_mutation_floor.py).
mutation-sample:
	nice -n 19 $(PYTHON) bench/mutation.py --sample-table --seed 15
