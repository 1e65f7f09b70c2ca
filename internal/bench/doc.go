// Package bench is banger's benchmark suite: each figure measured side by
// side with its baseline in one run (see docs/BENCHMARKS.md). It runs as
// TestBench, skipped unless scripts/bench asks for it:
//
//	scripts/bench [--quick] [--json FILE] [--md FILE]
package bench
