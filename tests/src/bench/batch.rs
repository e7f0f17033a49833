//! A batch of containers wired through weft and removed again, timed: what the attach, ports,
//! floor and dual-stack cases share. The namespaces are made beforehand (the runtime's job, not
//! timed); container `i` is `<tag><i>`, in namespace `<lab prefix>-<tag><i>`, attached and
//! detached through client connection `i % concurrency`.

use std::sync::Mutex;

use anyhow::{Context, Result};
use weft_proto::v1 as pb;

use super::client::{delete_namespaces, namespaces, Client};
use super::{timed, Run};
use crate::Lab;

/// `n` containers' namespaces, and how many clients drive them.
pub struct Batch {
    tag: String,
    namespaces: Vec<String>,
    concurrency: usize,
}

/// A timed attach of a whole batch.
pub struct Attached {
    pub run: Run,
    /// What the agent answered for each container, in order.
    pub endpoints: Vec<pb::Endpoint>,
}

impl Batch {
    /// Creates the batch's namespaces.
    pub fn new(lab: &Lab, tag: &str, n: usize, concurrency: usize) -> Result<Self> {
        Ok(Self {
            tag: tag.to_string(),
            namespaces: namespaces(lab, tag, n)?,
            concurrency,
        })
    }

    /// The namespace of container `i`.
    pub fn namespace(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    fn id(&self, i: usize) -> String {
        format!("{}{i}", self.tag)
    }

    /// Attaches every container, with the published ports `ports(i)`.
    pub fn attach(
        &self,
        client: &Client,
        ports: impl Fn(usize) -> Vec<pb::PortMapping> + Sync,
    ) -> Result<Attached> {
        let answers = Mutex::new(vec![None; self.namespaces.len()]);
        let run = timed(self.namespaces.len(), self.concurrency, |i| {
            let netns = format!("/run/netns/{}", self.namespaces[i]);
            let endpoint = client.attach(i % self.concurrency, self.id(i), netns, ports(i))?;
            answers.lock().unwrap()[i] = Some(endpoint);
            Ok(())
        })?;
        let endpoints = answers
            .into_inner()
            .unwrap()
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .context("an attach of the batch without its answer")?;
        Ok(Attached { run, endpoints })
    }

    /// Detaches every container.
    pub fn detach(&self, client: &Client) -> Result<Run> {
        timed(self.namespaces.len(), self.concurrency, |i| {
            client.detach(i % self.concurrency, self.id(i))
        })
    }

    /// Deletes the namespaces.
    pub fn remove(self) -> Result<()> {
        delete_namespaces(&self.namespaces)
    }
}
