//! `weftctl policy`: network policies in etcd. `apply` reads one policy or a list from a JSON or
//! YAML file, checks every field (an error names the field) and writes them all in one etcd
//! transaction, or nothing; `ls`, `get` and `delete` read and remove them.

use std::path::Path;

use clap::Subcommand;
use serde_json::{json, Value};
use tonic::Status;
use weft_etcd::policy::{policies_from_value, Policy};

use super::output::{print, table};
use super::{EtcdArgs, Failure};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create or replace policies from a JSON or YAML file (one policy or a list; `-` reads
    /// stdin). All are written in one etcd transaction, or none if any is invalid.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// List the policies in the order they apply.
    Ls {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Show one policy as JSON.
    Get {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete one policy; every host stops enforcing it.
    Delete {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

fn store_error(e: weft_etcd::StoreError) -> Failure {
    match e {
        weft_etcd::StoreError::Unavailable(m) => Status::unavailable(m).into(),
        other => Failure::Other(other.to_string()),
    }
}

pub(crate) async fn run(json_out: bool, command: PolicyCommand) -> Result<(), Failure> {
    match command {
        PolicyCommand::Apply { file, etcd } => apply(json_out, &file, &etcd).await,
        PolicyCommand::Ls { etcd } => ls(json_out, &etcd).await,
        PolicyCommand::Get { name, etcd } => {
            let store = etcd.connect().await?;
            let policy = store.get_policy(&name).await.map_err(store_error)?;
            let policy =
                policy.ok_or_else(|| Status::not_found(format!("no policy named {name:?}")))?;
            let doc = policy.to_json();
            print(json_out, doc.clone(), format!("{doc:#}"));
            Ok(())
        }
        PolicyCommand::Delete { name, etcd } => {
            let store = etcd.connect().await?;
            if !store.delete_policy(&name).await.map_err(store_error)? {
                return Err(Status::not_found(format!("no policy named {name:?}")).into());
            }
            print(
                json_out,
                json!({"deleted": name}),
                format!("deleted policy {name}"),
            );
            Ok(())
        }
    }
}

/// Reads a policy file: JSON, or YAML when it is not JSON.
pub(crate) fn read_file(path: &str) -> Result<Vec<Policy>, Failure> {
    let text = match path {
        "-" => std::io::read_to_string(std::io::stdin()),
        path => std::fs::read_to_string(Path::new(path)),
    }
    .map_err(|e| Failure::Other(format!("cannot read {path}: {e}")))?;
    let value: Value = match serde_json::from_str(&text) {
        Ok(value) => value,
        Err(json_error) => serde_yaml::from_str(&text).map_err(|yaml_error| {
            Status::invalid_argument(format!(
                "{path} is neither JSON ({json_error}) nor YAML ({yaml_error})"
            ))
        })?,
    };
    policies_from_value(&value)
        .map_err(|e| Status::invalid_argument(format!("invalid policy in {path}: {e}")).into())
}

async fn apply(json_out: bool, file: &str, etcd: &EtcdArgs) -> Result<(), Failure> {
    let policies = read_file(file)?;
    let store = etcd.connect().await?;
    store.put_policies(&policies).await.map_err(store_error)?;
    let names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
    print(
        json_out,
        json!({"applied": names}),
        format!("applied {}", names.join(", ")),
    );
    Ok(())
}

async fn ls(json_out: bool, etcd: &EtcdArgs) -> Result<(), Failure> {
    let store = etcd.connect().await?;
    let mut policies = store.list_policies().await.map_err(store_error)?;
    policies.sort_by(|a, b| a.apply_order(b));
    let count = |rules: &Option<Vec<_>>| {
        rules
            .as_ref()
            .map_or("-".to_string(), |r| r.len().to_string())
    };
    let rows: Vec<Vec<String>> = policies
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.order.map_or("-".to_string(), |o| o.to_string()),
                p.selector.to_string(),
                count(&p.ingress),
                count(&p.egress),
            ]
        })
        .collect();
    let docs: Vec<Value> = policies.iter().map(Policy::to_json).collect();
    print(
        json_out,
        Value::Array(docs),
        table(&["NAME", "ORDER", "SELECTOR", "INGRESS", "EGRESS"], &rows),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_files_read_like_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(
            &path,
            "- name: web\n  order: 100\n  selector: app == 'web'\n  ingress:\n    - action: allow\n      protocol: tcp\n      destination: {ports: [80, \"8000:8080\"]}\n- name: db\n  selector: app == 'db'\n  egress: []\n",
        )
        .unwrap();
        let policies = read_file(path.to_str().unwrap()).unwrap_or_else(|_| panic!("parse"));
        assert_eq!(policies.len(), 2);
        assert_eq!(policies[1].egress, Some(vec![]));
        std::fs::write(&path, "name: x\nselector: all()\ningres: []\n").unwrap();
        match read_file(path.to_str().unwrap()) {
            Err(Failure::Status(s)) => {
                assert_eq!(s.code(), tonic::Code::InvalidArgument);
                assert!(s.message().contains("ingres"), "{}", s.message());
            }
            _ => panic!("an unknown field must be refused"),
        }
    }
}
