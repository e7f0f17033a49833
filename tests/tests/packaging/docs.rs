//! Man pages and completions against the clap definitions the programs parse their flags with.

use std::path::Path;
use std::process::Command;

use clap::CommandFactory;

use super::{repo, run_ok, text};

/// Long flags of a command, without the ones clap adds.
fn long_flags(cmd: &clap::Command) -> Vec<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !["help", "version"].contains(l))
        .map(String::from)
        .collect()
}

/// Every subcommand path below `cmd` (["host", "remove"], ...), with its command.
fn subcommands(
    cmd: &clap::Command,
    path: Vec<String>,
    out: &mut Vec<(Vec<String>, clap::Command)>,
) {
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut p = path.clone();
        p.push(sub.get_name().to_string());
        out.push((p.clone(), sub.clone()));
        subcommands(sub, p, out);
    }
}

/// A man page as plain text for searching: roff's escaped hyphens made plain.
fn page(dir: &Path, name: &str) -> String {
    let path = dir.join(format!("man/{name}.8"));
    let roff = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    roff.replace("\\-", "-")
}

#[test]
fn man_pages_and_completions_cover_every_flag_of_the_programs() {
    let dir = tempfile::tempdir().unwrap();
    run_ok(Command::new(env!("CARGO_BIN_EXE_weft-docs")).arg(dir.path()));

    let agent = weft_agent::config::Flags::command();
    let agent_page = page(dir.path(), "weft-agent");
    for arg in agent.get_arguments().filter(|a| a.get_long().is_some()) {
        let flag = format!("--{}", arg.get_long().unwrap());
        assert!(agent_page.contains(&flag), "weft-agent(8) lacks {flag}");
        if let Some(env) = arg.get_env() {
            let env = env.to_string_lossy();
            assert!(agent_page.contains(&*env), "weft-agent(8) lacks {env}");
        }
    }

    let mut ctl = weft_cli::ctl::Cli::command();
    ctl.build();
    let ctl_page = page(dir.path(), "weftctl");
    let mut subs = vec![];
    subcommands(&ctl, vec![], &mut subs);
    assert!(
        subs.len() >= 13,
        "weftctl has its subcommands: {}",
        subs.len()
    );
    for (path, sub) in &subs {
        let name = format!("weftctl-{}", path.join("-"));
        let sub_page = page(dir.path(), &name);
        for flag in long_flags(sub) {
            assert!(
                sub_page.contains(&format!("--{flag}")),
                "{name}(8) lacks --{flag}"
            );
        }
        if path.len() == 1 {
            assert!(
                ctl_page.contains(&format!("{name}(8)")),
                "weftctl(8) lacks {name}(8)"
            );
        }
    }

    for (program, cmd) in [("weft-agent", &agent), ("weftctl", &ctl)] {
        let bash = std::fs::read_to_string(dir.path().join(format!("completions/bash/{program}")));
        let zsh = std::fs::read_to_string(dir.path().join(format!("completions/zsh/_{program}")));
        let fish =
            std::fs::read_to_string(dir.path().join(format!("completions/fish/{program}.fish")));
        let (bash, zsh, fish) = (bash.unwrap(), zsh.unwrap(), fish.unwrap());
        let mut all = vec![(vec![], cmd.clone())];
        subcommands(cmd, vec![], &mut all);
        for (path, sub) in &all {
            if let Some(last) = path.last() {
                for (shell, script) in [("bash", &bash), ("zsh", &zsh), ("fish", &fish)] {
                    assert!(
                        script.contains(last.as_str()),
                        "{shell}: {program} lacks {last}"
                    );
                }
            }
            for flag in long_flags(sub) {
                assert!(
                    bash.contains(&format!("--{flag}")),
                    "bash: {program} lacks --{flag}"
                );
                assert!(
                    zsh.contains(&format!("--{flag}")),
                    "zsh: {program} lacks --{flag}"
                );
                assert!(
                    fish.contains(&format!("-l {flag}")),
                    "fish: {program} lacks {flag}"
                );
            }
        }
    }

    // weft-cni takes no flags: its page must name every CNI_* variable its source reads, every
    // error code it answers with, and every spec version it speaks.
    let cni_page = page(dir.path(), "weft-cni");
    let cni_dir = repo().join("cli/src/cni");
    for entry in std::fs::read_dir(&cni_dir).unwrap() {
        let source = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for var in source.split('"').filter(|s| s.starts_with("CNI_")) {
            let var: String = var
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            assert!(cni_page.contains(&var), "weft-cni(8) lacks {var}");
        }
    }
    let spec = std::fs::read_to_string(cni_dir.join("spec.rs")).unwrap();
    for line in spec.lines().filter(|l| l.trim().starts_with("pub const ")) {
        if let Some(number) = line
            .trim()
            .strip_suffix(';')
            .and_then(|l| l.rsplit(' ').next())
        {
            if number.parse::<u32>().is_ok() {
                let tagged = format!("\\fB{number}\\fR");
                assert!(
                    cni_page.contains(&tagged),
                    "weft-cni(8) lacks code {number}"
                );
            }
        }
    }
    for version in weft_cli::cni::SUPPORTED {
        assert!(cni_page.contains(version), "weft-cni(8) lacks {version}");
    }

    // Every page renders without a warning from man (as lintian checks).
    for entry in std::fs::read_dir(dir.path().join("man")).unwrap() {
        let path = entry.unwrap().path();
        let out = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .output()
            .expect("man (Debian package man-db)");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
    }
}
