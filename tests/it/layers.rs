//! The module graph of `src/` has no cycle and no import from a lower layer to a
//! higher one (the table in docs/ARCHITECTURE.md, "Layers", which
//! `scripts/modgraph.py` holds and checks).

use std::process::Command;

#[test]
fn the_module_graph_has_no_cycle_and_no_upward_import() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{repo}/scripts/modgraph.py"))
        .args(["--src", &format!("{repo}/src")])
        .output()
        .expect("python3 runs scripts/modgraph.py");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scripts/modgraph.py found a cycle or an upward import:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains(" 0 cycles, 0 upward imports"), "{report}");
}
