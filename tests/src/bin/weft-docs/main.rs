//! `weft-docs OUTDIR`: writes the man pages and shell completions of the weft programs, generated
//! from the clap definitions the programs parse their arguments with (`weft_agent::config::Flags`,
//! `weft_cli::ctl::Cli`), so they cannot drift from the programs. `weft-cni` takes no arguments
//! (the runtime drives it through `CNI_*` variables and stdin); its page is described in `cni`.
//!
//! Layout under OUTDIR, as `deploy/package` installs it:
//! `man/*.8` (uncompressed; the package script compresses), `completions/bash/<prog>`,
//! `completions/zsh/_<prog>`, `completions/fish/<prog>.fish`.
//!
//! A doc-only tool: it lives in the tests crate so the runtime crates do not carry
//! clap_mangen and clap_complete.

mod cni;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

/// The manual section: all three are administration tools that need root.
pub const SECTION: &str = "8";
const MANUAL: &str = "weft";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out] = args.as_slice() else {
        eprintln!("usage: weft-docs OUTDIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-docs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every page and completion; returns the files written.
fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    let mut files = vec![];

    let agent = weft_agent::config::Flags::command();
    files.extend(man_pages(&agent, &man, &agent_extra())?);
    let ctl = weft_cli::ctl::Cli::command();
    files.extend(man_pages(&ctl, &man, &ctl_extra())?);
    let path = man.join(format!("weft-cni.{SECTION}"));
    std::fs::write(&path, cni::page())?;
    files.push(path);

    for cmd in [agent, ctl] {
        files.extend(completions(cmd, &out.join("completions"))?);
    }
    Ok(files)
}

/// Hand-written sections appended to a page: (heading, [(term, text)]).
type Extra = Vec<(&'static str, Vec<(String, String)>)>;

fn agent_extra() -> Extra {
    vec![
        (
            "FILES",
            vec![
                (
                    "/etc/weft/agent.toml".into(),
                    "Every setting, keyed by the long flag names; flags win over the environment, \
                     which wins over this file."
                        .into(),
                ),
                (
                    "/run/weft/agent.sock".into(),
                    "The gRPC API socket (mode 0600) that weftctl(8) and weft-cni(8) use.".into(),
                ),
                (
                    "/etc/iproute2/rt_protos.d/weft.conf".into(),
                    "Names protocol 119 \"weft\", so ip route shows the agent's routes as proto weft."
                        .into(),
                ),
            ],
        ),
        (
            "ENVIRONMENT",
            vec![(
                "WEFT_LOG".into(),
                "Log filter, e.g. debug or weft_agent=debug (default info).".into(),
            )],
        ),
        (
            "SIGNALS",
            vec![(
                "SIGTERM, SIGINT".into(),
                "Stop the agent. Routes, rules and veths stay in the kernel: traffic keeps flowing \
                 while the agent is down or restarting."
                    .into(),
            )],
        ),
        see_also(&["weftctl(8)", "weft-cni(8)", "systemctl(1)"]),
    ]
}

fn ctl_extra() -> Extra {
    vec![
        (
            "FILES",
            vec![(
                "/run/weft/agent.sock".into(),
                "The local agent's API socket (--socket).".into(),
            )],
        ),
        see_also(&["weft-agent(8)", "weft-cni(8)"]),
    ]
}

pub fn see_also(pages: &[&str]) -> (&'static str, Vec<(String, String)>) {
    ("SEE ALSO", vec![(pages.join(", "), String::new())])
}

/// Renders `extra` as roff sections: a tagged paragraph per term, a plain one without a term.
pub fn render_extra(extra: &Extra) -> String {
    let mut roff = Roff::new();
    for (heading, items) in extra {
        roff.control("SH", [*heading]);
        for (term, text) in items {
            if text.is_empty() {
                roff.text([roman(term.as_str())]);
                continue;
            }
            roff.control("TP", []);
            roff.text([bold(term.as_str())]);
            roff.text([roman(text.as_str())]);
        }
    }
    roff.render()
}

/// The page of `cmd` and, git-style, one page per subcommand (`weftctl-host-remove(8)`), which
/// the parent's SUBCOMMANDS section names.
fn man_pages(cmd: &clap::Command, dir: &Path, extra: &Extra) -> std::io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.clone().disable_help_subcommand(true);
    cmd.build();
    let mut files = vec![];
    let parent = cmd.get_name().to_string();
    write_pages(&cmd, dir, extra, &parent, &mut files)?;
    Ok(files)
}

fn write_pages(
    cmd: &clap::Command,
    dir: &Path,
    extra: &Extra,
    program: &str,
    files: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_extra = vec![see_also(&[&format!("{program}({SECTION})")])];
        write_pages(sub, dir, &sub_extra, program, files)?;
    }
    // Subcommands carry no version of their own: name the program's in every footer.
    let version = env!("CARGO_PKG_VERSION");
    let man = Man::new(cmd.clone())
        .section(SECTION)
        .manual(MANUAL)
        .source(format!("{program} {version}"));
    let path = dir.join(man.get_filename());
    std::fs::write(&path, render_page(&man, cmd, extra)?)?;
    files.push(path);
    Ok(())
}

/// clap_mangen's own order, with the hand-written sections before VERSION.
fn render_page(man: &Man, cmd: &clap::Command, extra: &Extra) -> std::io::Result<Vec<u8>> {
    let mut page = vec![];
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut page)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut page)?;
    }
    if cmd.get_after_long_help().is_some() || cmd.get_after_help().is_some() {
        man.render_extra_section(&mut page)?;
    }
    page.extend(render_extra(extra).into_bytes());
    if cmd.get_version().is_some() {
        man.render_version_section(&mut page)?;
    }
    Ok(page)
}

/// bash, zsh and fish completions of one program, named as each shell's loader expects.
fn completions(mut cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    let mut files = vec![];
    for (shell, file) in [
        (Shell::Bash, format!("bash/{name}")),
        (Shell::Zsh, format!("zsh/_{name}")),
        (Shell::Fish, format!("fish/{name}.fish")),
    ] {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("a folder"))?;
        let mut script = vec![];
        clap_complete::generate(shell, &mut cmd, &name, &mut script);
        std::fs::write(&path, script)?;
        files.push(path);
    }
    Ok(files)
}
