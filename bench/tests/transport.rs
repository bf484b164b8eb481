//! `dvm-bench transport` runs both nodes over TCP and prints every row with a figure; on a
//! host without RDMA the RDMA column says n/a and the reason goes to stderr.

use std::process::Command;

#[test]
fn the_transport_table_has_a_figure_in_every_tcp_row() {
    let output = Command::new(env!("CARGO_BIN_EXE_dvm-bench"))
        .args(["transport", "--round-trips", "200", "--pages", "200"])
        .args(["--messages", "2000"])
        .output()
        .expect("dvm-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ")).collect();
    assert!(
        rows[0].contains("io_uring TCP") && rows[0].contains("RDMA verbs"),
        "{stdout}"
    );
    let tcp_cell = |row: &&str| row.split('|').nth(2).unwrap_or("").trim().to_string();
    // Page fetches by one-sided READ exist only over RDMA: no TCP figure.
    let read_rows: Vec<&&str> = rows[1..]
        .iter()
        .filter(|row| row.contains("by RDMA READ") || row.contains("by one RDMA READ"))
        .collect();
    assert_eq!(read_rows.len(), 3, "{stdout}");
    assert!(read_rows.iter().all(|row| tcp_cell(row) == "-"), "{stdout}");
    let figures: Vec<String> = rows[1..]
        .iter()
        .filter(|row| !row.contains("per operation") && !row.contains("RDMA READ"))
        .map(tcp_cell)
        .collect();
    assert_eq!(figures.len(), 7, "{stdout}");
    for figure in figures {
        let value: f64 = figure
            .parse()
            .unwrap_or_else(|_| panic!("{figure:?} in\n{stdout}"));
        assert!(value > 0.0, "{stdout}");
    }
    if stdout.contains("| n/a |") {
        assert!(stderr.contains("no RDMA column:"), "{stderr}");
    }
}
