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
