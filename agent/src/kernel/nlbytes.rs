//! Reading netlink messages in place: the datagrams the agent parses by hand (link dumps and
//! kernel notifications, read for a few attributes each) are walked with these.

/// A netlink message: its type, flags and sequence number, and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The messages of a datagram, in order; `Err` for a length that runs past its end.
pub fn messages(mut datagram: &[u8]) -> impl Iterator<Item = Result<Message<'_>, Malformed>> {
    std::iter::from_fn(move || {
        if datagram.len() < 16 {
            return None;
        }
        let len = u32_at(datagram, 0) as usize;
        if len < 16 || len > datagram.len() {
            datagram = &[];
            return Some(Err(Malformed));
        }
        let message = Message {
            kind: u16_at(datagram, 4),
            flags: u16_at(datagram, 6),
            seq: u32_at(datagram, 8),
            payload: &datagram[16..len],
        };
        datagram = &datagram[align(len).min(datagram.len())..];
        Some(Ok(message))
    })
}

/// A message whose length does not fit its datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a netlink message's length runs past its datagram")]
pub struct Malformed;

/// The attributes in a run of them: (type without the nested and byte-order flags, value).
/// A malformed tail ends the run.
pub fn attributes(mut run: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if run.len() < 4 {
            return None;
        }
        let len = u16_at(run, 0) as usize;
        if len < 4 || len > run.len() {
            return None;
        }
        let attribute = (u16_at(run, 2) & 0x3fff, &run[4..len]);
        run = &run[align(len).min(run.len())..];
        Some(attribute)
    })
}

const IFLA_IFNAME: u16 = 3;
const IFLA_AF_SPEC: u16 = 26;
const IFLA_GROUP: u16 = 27;

/// What a link message (`RTM_NEWLINK` or `RTM_DELLINK`) says of the link: its index, name and
/// group, and its per-family settings (`IFLA_AF_SPEC`) to read if wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkHeader<'a> {
    pub index: u32,
    pub name: String,
    pub group: u32,
    pub spec: Option<&'a [u8]>,
}

/// Reads a link message's payload (ifinfomsg, then attributes); None when too short.
pub fn parse_link(payload: &[u8]) -> Option<LinkHeader<'_>> {
    let attributes = payload.get(16..)?;
    let mut link = LinkHeader {
        index: u32_at(payload, 4),
        name: String::new(),
        group: 0,
        spec: None,
    };
    for (kind, value) in self::attributes(attributes) {
        match kind {
            IFLA_IFNAME => link.name = string_value(value),
            IFLA_GROUP => link.group = u32_value(value).unwrap_or(0),
            IFLA_AF_SPEC => link.spec = Some(value),
            _ => {}
        }
    }
    Some(link)
}

/// An attribute's value as a u32, if it holds one.
pub fn u32_value(value: &[u8]) -> Option<u32> {
    (value.len() >= 4).then(|| u32_at(value, 0))
}

/// An attribute's value as a string (up to its terminating NUL).
pub fn string_value(value: &[u8]) -> String {
    let bytes = value.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Native-endian u16 at `at` (which the caller has checked is in bounds).
pub fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

/// Native-endian u32 at `at` (which the caller has checked is in bounds).
pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = vec![];
        a.extend(((4 + value.len()) as u16).to_ne_bytes());
        a.extend(kind.to_ne_bytes());
        a.extend(value);
        a.resize(align(a.len()), 0);
        a
    }

    #[test]
    fn attributes_are_walked_with_padding_and_flags_stripped() {
        let mut run = attribute(3, b"weft1\0");
        run.extend(attribute(26 | 0x8000, &7u32.to_ne_bytes()));
        run.extend([1, 0]); // a tail too short for a header
        let read: Vec<(u16, Vec<u8>)> = attributes(&run).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(read.len(), 2);
        assert_eq!(string_value(&read[0].1), "weft1");
        assert_eq!((read[1].0, u32_value(&read[1].1)), (26, Some(7)));
        assert_eq!(u32_value(&[1, 2]), None);
    }

    #[test]
    fn messages_stop_at_a_length_past_the_end() {
        let mut datagram = vec![];
        datagram.extend(20u32.to_ne_bytes());
        datagram.extend(16u16.to_ne_bytes());
        datagram.extend(2u16.to_ne_bytes());
        datagram.extend(9u32.to_ne_bytes());
        datagram.extend(0u32.to_ne_bytes());
        datagram.extend([1, 2, 3, 4]);
        let mut bad = datagram.clone();
        bad[0] = 200;
        datagram.extend(&bad);
        let read: Vec<_> = messages(&datagram).collect();
        assert_eq!(read.len(), 2);
        let first = read[0].unwrap();
        assert_eq!((first.kind, first.flags, first.seq), (16, 2, 9));
        assert_eq!(first.payload, [1, 2, 3, 4]);
        assert_eq!(read[1], Err(Malformed));
    }
}
