//! The page of `weft-cni(8)`. The plugin parses no arguments: the container runtime drives it
//! through `CNI_*` environment variables and the network configuration on stdin. So its page is
//! a clap `Command` for the name, description and version, plus sections for the environment,
//! stdin, stdout and errors. Supported versions and error codes come from `weft_cli::cni`
//! itself; the packaging test checks every `CNI_*` variable the plugin's source reads is here.

use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;
use weft_cli::cni::{code, SUPPORTED};

use super::{render_extra, see_also, MANUAL, SECTION};

/// The variables the plugin reads, and what for.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD, DEL, CHECK, STATUS, GC or VERSION."),
    (
        "CNI_CONTAINERID",
        "The runtime's container id (ADD, DEL, CHECK). With the network name and CNI_IFNAME it \
         becomes the weft container id cni-<hash>-<first 12 characters of the id>.",
    ),
    (
        "CNI_NETNS",
        "Path of the container's network namespace (ADD, CHECK).",
    ),
    (
        "CNI_IFNAME",
        "Interface to create inside the container (ADD, CHECK; DEL assumes eth0 when unset).",
    ),
];

/// The error codes the plugin answers with, as the spec's error JSON on stdout.
fn errors() -> Vec<(u32, &'static str)> {
    vec![
        (code::INCOMPATIBLE_VERSION, "cniVersion not supported"),
        (
            code::UNSUPPORTED_FIELD,
            "unsupported field (a port mapping with a hostIP other than 0.0.0.0)",
        ),
        (code::UNKNOWN_CONTAINER, "unknown container"),
        (
            code::INVALID_ENV,
            "missing or invalid CNI_* variable, or CHECK of an attachment in another namespace",
        ),
        (code::IO, "stdin could not be read"),
        (
            code::DECODE,
            "the network configuration could not be decoded",
        ),
        (code::INVALID_CONFIG, "the agent refused the request"),
        (
            code::TRY_AGAIN_LATER,
            "the agent or etcd is unreachable; try again",
        ),
        (
            code::NOT_AVAILABLE,
            "STATUS: the agent or etcd is unreachable",
        ),
        (code::PORT_TAKEN, "a host port is taken"),
        (code::POOL_EXHAUSTED, "the address pool is exhausted"),
        (code::AGENT_ERROR, "any other agent error"),
        (
            code::DATAPLANE_DAMAGED,
            "CHECK found the dataplane damaged; details names every problem (ADD again repairs)",
        ),
    ]
}

fn command() -> clap::Command {
    clap::Command::new("weft-cni")
        .version(env!("CARGO_PKG_VERSION"))
        .about("CNI plugin that wires containers into the weft fabric")
        .long_about(format!(
            "weft-cni is a CNI plugin (spec {}) that hands every operation to the local \
             weft-agent(8) over its API socket: ADD attaches the container (a veth pair, a /32 \
             address with gateway 169.254.1.1, a default route, published ports), DEL detaches it \
             (idempotent), CHECK asks the agent to verify the whole dataplane of the attachment, \
             STATUS reports whether the agent and etcd answer, GC detaches every attachment of \
             this network the runtime no longer lists, VERSION prints the supported versions.\n\n\
             It is run by a container runtime, not by people: it takes no arguments.",
            SUPPORTED.join(", ")
        ))
        .disable_help_flag(true)
        .disable_version_flag(true)
}

/// Sections only this page has.
fn io_sections() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, text) in ENVIRONMENT {
        roff.control("TP", []);
        roff.text([bold(*name)]);
        roff.text([roman(*text)]);
    }
    roff.control("SH", ["STANDARD INPUT"]);
    roff.text([roman(
        "The network configuration (JSON). Read: cniVersion, name, type, socket (the agent's API \
         socket, default /run/weft/agent.sock), runtimeConfig.portMappings (with the \
         portMappings capability), cni.dev/valid-attachments (GC).",
    )]);
    roff.control("SH", ["STANDARD OUTPUT"]);
    roff.text([roman(
        "ADD: the result (interface, address, gateway, default route). VERSION: the supported \
         versions. On failure: the error JSON {cniVersion, code, msg, details} and exit status 1.",
    )]);
    roff.control("SH", ["ERRORS"]);
    for (number, text) in errors() {
        roff.control("TP", []);
        roff.text([bold(number.to_string())]);
        roff.text([roman(text)]);
    }
    roff.control("SH", ["EXAMPLES"]);
    roff.text([roman("A network configuration list for the runtime:")]);
    roff.control("PP", []);
    roff.control("nf", []);
    for line in [
        "{ \"cniVersion\": \"1.0.0\", \"name\": \"weft\", \"plugins\": [",
        "  { \"type\": \"weft-cni\", \"socket\": \"/run/weft/agent.sock\",",
        "    \"capabilities\": { \"portMappings\": true } } ] }",
    ] {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
    roff
}

/// The whole page, in roff.
pub fn page() -> String {
    let man = Man::new(command()).section(SECTION).manual(MANUAL);
    let mut out = vec![];
    let render = |out: &mut Vec<u8>| -> std::io::Result<()> {
        man.render_title(out)?;
        man.render_name_section(out)?;
        let mut synopsis = Roff::new();
        synopsis.control("SH", ["SYNOPSIS"]);
        synopsis.text([
            bold("CNI_COMMAND"),
            roman("=ADD|DEL|CHECK|STATUS|GC|VERSION ... "),
            bold("weft-cni"),
            roman(" < network.json"),
        ]);
        synopsis.to_writer(out)?;
        man.render_description_section(out)?;
        io_sections().to_writer(out)?;
        let files = (
            "FILES",
            vec![(
                "/usr/lib/cni/weft-cni".into(),
                "Where the runtime looks for plugins (its CNI path).".into(),
            )],
        );
        let extra = vec![
            files,
            see_also(&["weft-agent(8)", "weftctl(8)", "podman-network(1)"]),
        ];
        out.extend(render_extra(&extra).into_bytes());
        man.render_version_section(out)
    };
    render(&mut out).expect("writing to memory");
    String::from_utf8(out).expect("roff of UTF-8 input is UTF-8")
}
