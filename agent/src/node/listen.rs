//! Whether a TCP port is in LISTEN state in this network namespace, read from /proc/net/tcp{,6}.
//! Checking the kernel's table avoids connecting to engine ports (llama.cpp's rpc server serves
//! one client at a time, and a probe connection would be a client).

pub fn is_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .any(|t| table_has_listener(&t, port))
}

fn table_has_listener(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace();
        let local = f.nth(1);
        let state = f.nth(1);
        matches!((local, state), (Some(l), Some("0A")) if l.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) == Some(port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_rows_only() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:C354 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n   1: 0100007F:1F90 0100007F:C354 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        assert!(table_has_listener(t, 0xC354));
        assert!(!table_has_listener(t, 0x1F90), "established, not listening");
    }

    #[test]
    fn sees_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(is_listening(port));
        drop(l);
    }
}
