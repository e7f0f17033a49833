//! `weft-cni`: the CNI plugin. Reads the CNI environment and the network configuration on stdin,
//! asks the local weft agent, prints the spec's result or error JSON.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use weft_cli::cni;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let env = cni::Env::from_process();
    let mut stdin = vec![];
    // VERSION gets `{"cniVersion": ...}` on stdin too; read it so the runtime's write never
    // meets a closed pipe. Only a person at a terminal gets no wait.
    if !(env.command == "VERSION" && std::io::stdin().is_terminal()) {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            let err = cni::CniError::new(cni::code::IO, format!("reading stdin: {e}"));
            println!("{}", err.to_json("1.0.0"));
            return ExitCode::FAILURE;
        }
    }
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .unwrap_or_else(|| "1.0.0".into());
    match cni::run(&env, &stdin).await {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            println!("{}", err.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
