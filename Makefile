# Ferry: the README's two commands are `make demo` and `make test`.
BUILD ?= build

.PHONY: all setup build test demo asan fuzz bundle clean

all: build

setup:
	scripts/setup.sh

build:
	scripts/setup.sh --no-model
	[ -f $(BUILD)/build.ninja ] || meson setup $(BUILD)
	ninja -C $(BUILD)

# Sets up, builds, runs every suite; the last line is "N passed, N failed, N skipped".
test:
	scripts/test.sh $(BUILD)

# A local cluster on this machine with the real model (see README.md).
demo:
	scripts/demo.sh

# Unit, integration and fuzz suites under AddressSanitizer + UndefinedBehaviorSanitizer.
asan:
	FERRY_MESON_ARGS="-Db_sanitize=address,undefined -Dcuda=disabled -Dbuildtype=debug" \
		scripts/test.sh build-asan --suite unit --suite integration --suite fuzz

# Coverage-guided fuzzing of every parser (libFuzzer, clang, ASan + UBSan), FUZZ_SECONDS each;
# new inputs stay in build-fuzz/corpus/, crashes go to build-fuzz/crash/.
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS) build-fuzz

# Offline GPU bundle: dist/ferry-bundle/ and dist/ferry-bundle.tar.gz, at most 60 MiB
# (release build with CUDA in build-bundle; see docs/gpu.md).
bundle:
	scripts/bundle.sh

clean:
	rm -rf build build-asan build-fuzz
