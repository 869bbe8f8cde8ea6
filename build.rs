//! Lists the console's commands: every file in `src/proxy/console/commands/` (but `mod.rs`) is a command
//! module defining `COMMAND`, so adding a console command is adding its file.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proxy/console/commands");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("src/proxy/console/commands")
        .filter_map(|e| {
            let p = e.ok()?.path();
            let stem = p.file_stem()?.to_str()?.to_string();
            (p.extension()? == "rs" && stem != "mod").then_some(stem)
        })
        .collect();
    names.sort();
    let mut out = String::new();
    for n in &names {
        let path = dir.join(format!("{n}.rs"));
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(
            out,
            "#[path = {:?}]\npub mod {n};",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push_str(
        "\n/// Every console command.\npub static ALL: &[&dyn super::command::Command] = &[\n",
    );
    for n in &names {
        writeln!(out, "    &{n}::COMMAND,").unwrap();
    }
    out.push_str("];\n");
    let target = Path::new(&std::env::var("OUT_DIR").unwrap()).join("console_commands.rs");
    std::fs::write(target, out).unwrap();
}
