use super::*;
use crate::test_utils::{CountingInterrupt, RecordingSink};

fn i8042() -> (I8042, Arc<RecordingSink>) {
    let sink = Arc::new(RecordingSink::default());
    (I8042::new(sink.clone()), sink)
}

/// A controller with a keyboard, its interrupt line and its event sink.
fn with_keyboard() -> (I8042, Arc<CountingInterrupt>, Arc<RecordingSink>) {
    let sink = Arc::new(RecordingSink::default());
    let irq = Arc::new(CountingInterrupt::default());
    (I8042::with_keyboard(sink.clone(), irq.clone()), irq, sink)
}

fn read(dev: &mut I8042, offset: u64) -> u8 {
    let mut data = [0u8; 1];
    dev.read(offset, &mut data);
    data[0]
}

fn output_full(dev: &mut I8042) -> bool {
    read(dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0
}

/// Sends a command and returns the response, as Linux's `i8042_command` does.
fn command(dev: &mut I8042, cmd: u8) -> Option<u8> {
    dev.write(COMMAND_OFFSET, &[cmd]);
    output_full(dev).then(|| read(dev, DATA_OFFSET))
}

fn write_ctr(dev: &mut I8042, ctr: u8) {
    dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
    dev.write(DATA_OFFSET, &[ctr]);
}

/// Reads every byte waiting, as an interrupt handler would, checking that each keyboard byte
/// came with exactly one interrupt (counted from `*irqs` on).
fn drain(dev: &mut I8042, irq: &CountingInterrupt, irqs: &mut usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    while output_full(dev) {
        *irqs += 1;
        assert_eq!(
            irq.count(),
            *irqs,
            "one interrupt per byte, before {bytes:x?}"
        );
        bytes.push(read(dev, DATA_OFFSET));
    }
    assert_eq!(irq.count(), *irqs, "no interrupt without a byte");
    bytes
}

/// Writes `bytes` to the keyboard one at a time and collects the answers.
fn to_keyboard(
    dev: &mut I8042,
    irq: &CountingInterrupt,
    irqs: &mut usize,
    bytes: &[u8],
) -> Vec<u8> {
    let mut answers = Vec::new();
    for &b in bytes {
        dev.write(DATA_OFFSET, &[b]);
        answers.extend(drain(dev, irq, irqs));
    }
    answers
}

/// The command byte Linux's i8042 driver runs with: keyboard interrupt on, translation on,
/// the (absent) AUX port disabled.
const LINUX_CTR: u8 = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLED | CTR_TRANSLATE;

/// What Linux's i8042 driver and then atkbd do at boot (6.1, a translating controller):
/// controller tests, the command byte, then atkbd's probe, set-up and enable. Returns the
/// interrupts counted so far.
fn linux_probe(dev: &mut I8042, irq: &CountingInterrupt) -> usize {
    assert!(!output_full(dev), "nothing to flush");
    assert_eq!(command(dev, CMD_READ_CTR), Some(CTR_INITIAL));
    write_ctr(dev, CTR_INITIAL | CTR_KBD_DISABLED | CTR_AUX_DISABLED);
    assert_eq!(command(dev, CMD_SELF_TEST), Some(SELF_TEST_PASSED));
    assert_eq!(command(dev, CMD_TEST_KBD), Some(INTERFACE_TEST_PASSED));
    write_ctr(dev, LINUX_CTR);
    assert_eq!(irq.count(), 0, "controller responses raise no interrupt");
    let mut irqs = 0;
    // atkbd_probe: GETID (translated: 0xab 0x41), then deactivate.
    assert_eq!(
        to_keyboard(dev, irq, &mut irqs, &[0xf2]),
        [0xfa, 0xab, 0x41]
    );
    assert_eq!(to_keyboard(dev, irq, &mut irqs, &[0xf5]), [0xfa]);
    // atkbd_reset_state: LEDs off, fastest typematic rate; atkbd_activate: enable.
    assert_eq!(
        to_keyboard(dev, irq, &mut irqs, &[0xed, 0x00, 0xf3, 0x00, 0xf4]),
        [0xfa; 5]
    );
    irqs
}

#[test]
fn offsets_match_ports() {
    assert_eq!(COMMAND_OFFSET, 4);
    assert_eq!(
        u64::from(I8042_DATA_PORT) + I8042_PORT_LEN - 1,
        u64::from(I8042_COMMAND_PORT)
    );
}

#[test]
fn status_when_idle_is_not_inhibited_with_system_flag() {
    let (mut dev, _) = i8042();
    assert_eq!(read(&mut dev, COMMAND_OFFSET), 0x14);
    write_ctr(&mut dev, 0);
    assert_eq!(read(&mut dev, COMMAND_OFFSET), 0x10);
}

#[test]
fn reset_command_notifies_reset() {
    let (mut dev, sink) = i8042();
    assert_eq!(command(&mut dev, I8042_CMD_RESET_CPU), None);
    assert_eq!(sink.events(), vec![GuestEvent::Reset]);
}

#[test]
fn self_test_answers_0x55_once() {
    let (mut dev, sink) = i8042();
    dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
    assert!(output_full(&mut dev));
    assert_eq!(read(&mut dev, DATA_OFFSET), 0x55);
    assert!(!output_full(&mut dev), "response consumed");
    assert!(sink.events().is_empty());
}

#[test]
fn interface_tests_pass() {
    let (mut dev, _) = i8042();
    assert_eq!(command(&mut dev, CMD_TEST_KBD), Some(0x00));
    assert_eq!(command(&mut dev, CMD_TEST_AUX), Some(0x00));
}

#[test]
fn command_byte_round_trips() {
    let (mut dev, _) = i8042();
    assert_eq!(command(&mut dev, CMD_READ_CTR), Some(CTR_INITIAL));
    assert_eq!(CTR_INITIAL & CTR_KBD_INT, 0, "interrupts off at power-on");
    write_ctr(&mut dev, 0x56);
    assert_eq!(command(&mut dev, CMD_READ_CTR), Some(0x56));
    // A data write not preceded by 0x60 goes to the (absent) keyboard.
    dev.write(DATA_OFFSET, &[0x11]);
    assert_eq!(command(&mut dev, CMD_READ_CTR), Some(0x56));
}

#[test]
fn port_enable_and_disable_update_command_byte() {
    let (mut dev, _) = i8042();
    command(&mut dev, CMD_DISABLE_KBD);
    command(&mut dev, CMD_DISABLE_AUX);
    let ctr = command(&mut dev, CMD_READ_CTR).unwrap();
    assert_eq!(ctr & (CTR_KBD_DISABLED | CTR_AUX_DISABLED), 0x30);
    command(&mut dev, CMD_ENABLE_KBD);
    command(&mut dev, CMD_ENABLE_AUX);
    let ctr = command(&mut dev, CMD_READ_CTR).unwrap();
    assert_eq!(ctr & (CTR_KBD_DISABLED | CTR_AUX_DISABLED), 0);
}

#[test]
fn unknown_commands_are_ignored() {
    let (mut dev, sink) = i8042();
    // AUX loopback with its parameter: no response, command byte untouched.
    assert_eq!(command(&mut dev, 0xd3), None);
    dev.write(DATA_OFFSET, &[0x5a]);
    assert!(!output_full(&mut dev));
    assert_eq!(command(&mut dev, CMD_READ_CTR), Some(CTR_INITIAL));
    // A command between 0x60 and its parameter cancels the write.
    dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
    dev.write(COMMAND_OFFSET, &[0xd3]);
    dev.write(DATA_OFFSET, &[0x00]);
    assert_eq!(command(&mut dev, CMD_READ_CTR), Some(CTR_INITIAL));
    assert!(sink.events().is_empty());
}

#[test]
fn other_ports_and_sizes_read_all_ones() {
    let (mut dev, sink) = i8042();
    assert_eq!(read(&mut dev, 1), 0xff);
    let mut wide = [0u8; 2];
    dev.read(COMMAND_OFFSET, &mut wide);
    assert_eq!(wide, [0xff, 0xff]);
    dev.write(COMMAND_OFFSET, &[I8042_CMD_RESET_CPU, 0]);
    dev.write(1, &[I8042_CMD_RESET_CPU]);
    assert!(sink.events().is_empty());
}

#[test]
fn without_a_keyboard_ctrl_alt_del_fails_and_data_is_dropped() {
    let (mut dev, _) = i8042();
    assert_eq!(dev.send_ctrl_alt_del(), Err(I8042Error::NoKeyboard));
    dev.write(DATA_OFFSET, &[0xf2]);
    assert!(!output_full(&mut dev));
    assert_eq!(dev.save_keyboard_state(), I8042KeyboardState::default());
    dev.restore_keyboard_state(&I8042KeyboardState::default())
        .unwrap();
}

#[test]
fn linux_probe_is_answered_one_interrupt_per_byte() {
    let (mut dev, irq, sink) = with_keyboard();
    linux_probe(&mut dev, &irq);
    assert!(sink.events().is_empty());
}

#[test]
fn ctrl_alt_del_arrives_in_set_1_through_translation() {
    let (mut dev, irq, _) = with_keyboard();
    let mut irqs = linux_probe(&mut dev, &irq);
    dev.send_ctrl_alt_del().unwrap();
    assert_eq!(
        drain(&mut dev, &irq, &mut irqs),
        [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
    );
    // Again: the keyboard keeps working.
    dev.send_ctrl_alt_del().unwrap();
    assert_eq!(drain(&mut dev, &irq, &mut irqs).len(), 8);
}

#[test]
fn without_translation_ctrl_alt_del_arrives_in_set_2() {
    let (mut dev, irq, _) = with_keyboard();
    write_ctr(&mut dev, CTR_KBD_INT);
    let mut irqs = 0;
    assert_eq!(
        to_keyboard(&mut dev, &irq, &mut irqs, &[0xf2]),
        [0xfa, 0xab, 0x83]
    );
    assert_eq!(
        to_keyboard(&mut dev, &irq, &mut irqs, &[0xf0, 0x00]),
        [0xfa, 0xfa, 0x02]
    );
    dev.send_ctrl_alt_del().unwrap();
    assert_eq!(
        drain(&mut dev, &irq, &mut irqs),
        [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
    );
    // In set 1, untranslated.
    to_keyboard(&mut dev, &irq, &mut irqs, &[0xf0, 0x01]);
    dev.send_ctrl_alt_del().unwrap();
    assert_eq!(
        drain(&mut dev, &irq, &mut irqs),
        [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
    );
}

#[test]
fn translated_scancode_set_answer() {
    let (mut dev, irq, _) = with_keyboard();
    write_ctr(&mut dev, LINUX_CTR);
    let mut irqs = 0;
    assert_eq!(
        to_keyboard(&mut dev, &irq, &mut irqs, &[0xf0, 0x00]),
        [0xfa, 0xfa, 0x41]
    );
}

#[test]
fn a_disabled_keyboard_reports_no_keys() {
    let (mut dev, irq, _) = with_keyboard();
    let mut irqs = linux_probe(&mut dev, &irq);
    to_keyboard(&mut dev, &irq, &mut irqs, &[0xf5]);
    assert_eq!(dev.send_ctrl_alt_del(), Err(I8042Error::KeyboardDisabled));
    assert!(!output_full(&mut dev));
    to_keyboard(&mut dev, &irq, &mut irqs, &[0xf4]);
    dev.send_ctrl_alt_del().unwrap();
    assert_eq!(drain(&mut dev, &irq, &mut irqs).len(), 8);
}

#[test]
fn keys_wait_while_the_interrupt_is_off_and_the_buffer_fills() {
    let (mut dev, irq, _) = with_keyboard();
    // Power-on state: scanning, translation, no interrupt.
    dev.send_ctrl_alt_del().unwrap();
    dev.send_ctrl_alt_del().unwrap();
    assert_eq!(dev.send_ctrl_alt_del(), Err(I8042Error::BufferFull));
    assert_eq!(irq.count(), 0);
    let mut bytes = Vec::new();
    while output_full(&mut dev) {
        bytes.push(read(&mut dev, DATA_OFFSET));
    }
    assert_eq!(bytes.len(), KEYBOARD_BUFFER_LEN);
    assert_eq!(bytes[..8], bytes[8..]);
    assert_eq!(irq.count(), 0);
}

#[test]
fn enabling_the_interrupt_raises_it_for_a_waiting_byte() {
    let (mut dev, irq, _) = with_keyboard();
    dev.send_ctrl_alt_del().unwrap();
    assert_eq!(irq.count(), 0);
    write_ctr(&mut dev, LINUX_CTR);
    assert_eq!(irq.count(), 1);
    // Status reads do not raise it again.
    assert!(output_full(&mut dev));
    assert_eq!(irq.count(), 1);
    let mut irqs = 1;
    assert_eq!(read(&mut dev, DATA_OFFSET), 0x1d);
    assert_eq!(drain(&mut dev, &irq, &mut irqs).len(), 7);
}

#[test]
fn a_disabled_keyboard_interface_holds_bytes_until_enabled() {
    let (mut dev, irq, _) = with_keyboard();
    write_ctr(&mut dev, LINUX_CTR | CTR_KBD_DISABLED);
    dev.send_ctrl_alt_del().unwrap();
    assert!(!output_full(&mut dev));
    dev.write(COMMAND_OFFSET, &[CMD_ENABLE_KBD]);
    assert_eq!(irq.count(), 1);
    let mut irqs = 1;
    assert_eq!(read(&mut dev, DATA_OFFSET), 0x1d);
    assert_eq!(drain(&mut dev, &irq, &mut irqs).len(), 7);
}

#[test]
fn controller_responses_go_before_keyboard_bytes() {
    let (mut dev, irq, _) = with_keyboard();
    let mut irqs = linux_probe(&mut dev, &irq);
    dev.send_ctrl_alt_del().unwrap();
    irqs += 1;
    assert_eq!(command(&mut dev, CMD_READ_CTR), Some(LINUX_CTR));
    // The displaced byte comes back, with a new interrupt.
    assert_eq!(
        drain(&mut dev, &irq, &mut irqs),
        [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
    );
}

#[test]
fn a_keyboard_command_discards_scancodes_not_yet_read() {
    let (mut dev, irq, _) = with_keyboard();
    let mut irqs = linux_probe(&mut dev, &irq);
    dev.send_ctrl_alt_del().unwrap();
    irqs += 1;
    // 0x1d is in the controller already; the rest goes.
    dev.write(DATA_OFFSET, &[0xed]);
    assert_eq!(read(&mut dev, DATA_OFFSET), 0x1d);
    assert_eq!(drain(&mut dev, &irq, &mut irqs), [0xfa]);
    assert_eq!(to_keyboard(&mut dev, &irq, &mut irqs, &[0x02]), [0xfa]);
}

#[test]
fn data_for_other_devices_does_not_reach_the_keyboard() {
    let (mut dev, irq, _) = with_keyboard();
    let mut irqs = linux_probe(&mut dev, &irq);
    for cmd in [CMD_WRITE_OUTPUT_PORT, CMD_WRITE_AUX_OUTPUT, CMD_WRITE_AUX] {
        dev.write(COMMAND_OFFSET, &[cmd]);
        dev.write(DATA_OFFSET, &[0xf2]);
        assert!(!output_full(&mut dev), "{cmd:#x}");
    }
    assert_eq!(irq.count(), irqs);
    // 0xd2: the byte comes back as keyboard data.
    dev.write(COMMAND_OFFSET, &[CMD_WRITE_KBD_OUTPUT]);
    dev.write(DATA_OFFSET, &[0x5a]);
    assert_eq!(drain(&mut dev, &irq, &mut irqs), [0x5a]);
}

#[test]
fn a_failing_interrupt_line_still_delivers_bytes() {
    let sink = Arc::new(RecordingSink::default());
    let irq = Arc::new(CountingInterrupt::failing());
    let mut dev = I8042::with_keyboard(sink, irq.clone());
    // Nine answers, each with its (failed) interrupt.
    assert_eq!(linux_probe(&mut dev, &irq), 9);
}

#[test]
fn keyboard_state_round_trips_through_a_snapshot() {
    let (mut dev, irq, _) = with_keyboard();
    let mut irqs = linux_probe(&mut dev, &irq);
    to_keyboard(&mut dev, &irq, &mut irqs, &[0xed, 0x04]);
    dev.send_ctrl_alt_del().unwrap();
    assert_eq!(read(&mut dev, DATA_OFFSET), 0x1d);
    dev.write(COMMAND_OFFSET, &[CMD_WRITE_AUX]);
    let (state, kbd_state) = (dev.save_state(), dev.save_keyboard_state());
    assert_eq!(kbd_state.leds, 4);
    assert_eq!(kbd_state.awaiting_data, Some(CMD_WRITE_AUX));
    let json = serde_json::to_string(&kbd_state).unwrap();
    let kbd_state: I8042KeyboardState = serde_json::from_str(&json).unwrap();

    let (mut copy, copy_irq, _) = with_keyboard();
    copy.restore_state(&state);
    copy.restore_keyboard_state(&kbd_state).unwrap();
    assert_eq!(copy.save_keyboard_state(), dev.save_keyboard_state());
    // The byte in the output buffer had its interrupt; the rest raise theirs.
    let mut copy_irqs = 0;
    assert_eq!(read(&mut copy, DATA_OFFSET), 0x38);
    assert_eq!(
        drain(&mut copy, &copy_irq, &mut copy_irqs),
        [0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
    );
    // The data byte for the AUX device is still swallowed.
    copy.write(DATA_OFFSET, &[0xf2]);
    assert!(!output_full(&mut copy));
}

#[test]
fn bad_keyboard_states_are_refused() {
    let (mut dev, _, _) = with_keyboard();
    let good = I8042KeyboardState::default();
    for bad in [
        I8042KeyboardState {
            queue: vec![0; KEYBOARD_BUFFER_LEN + 1],
            ..good.clone()
        },
        I8042KeyboardState {
            scancode_set: 4,
            ..good.clone()
        },
        I8042KeyboardState {
            pending_command: Some(0xf4),
            ..good.clone()
        },
        I8042KeyboardState {
            awaiting_data: Some(CMD_WRITE_CTR),
            ..good.clone()
        },
    ] {
        let err = dev.restore_keyboard_state(&bad).unwrap_err();
        assert_eq!(err.device, "i8042 keyboard");
    }
    // Nothing was changed; the default restores a keyboard just powered on.
    assert_eq!(dev.save_keyboard_state(), good);
    dev.restore_keyboard_state(&good).unwrap();
    dev.send_ctrl_alt_del().unwrap();
}

#[test]
fn old_snapshots_without_keyboard_state_parse() {
    let s: I8042State =
        serde_json::from_str(r#"{"control": 69, "output": null, "awaiting_ctr": false}"#).unwrap();
    assert_eq!(s.control, 69);
}

#[test]
fn works_through_the_bus() {
    let (dev, irq, _) = with_keyboard();
    let dev = Arc::new(std::sync::Mutex::new(dev));
    let bus = crate::bus::Bus::new();
    bus.insert(dev.clone(), u64::from(I8042_DATA_PORT), I8042_PORT_LEN)
        .unwrap();
    bus.write(u64::from(I8042_COMMAND_PORT), &[CMD_WRITE_CTR])
        .unwrap();
    bus.write(u64::from(I8042_DATA_PORT), &[LINUX_CTR]).unwrap();
    dev.lock().unwrap().send_ctrl_alt_del().unwrap();
    assert_eq!(irq.count(), 1);
    let mut data = [0u8; 1];
    bus.read(u64::from(I8042_DATA_PORT), &mut data).unwrap();
    assert_eq!(data, [0x1d]);
    assert_eq!(irq.count(), 2);
}
