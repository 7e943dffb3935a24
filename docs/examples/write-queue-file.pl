#!/usr/bin/perl
# Queue one message for qrouter by writing a queue file (docs/queue-format.md).
#
#   write-queue-file.pl SPOOL SENDER RECIPIENT... < message
#
# SENDER "" or "<>" is the null sender. Addresses may be given with or without angle
# brackets. Prints the queue id. Exits 64 for bad arguments, 75 (try again later) if the
# message could not be queued. Core modules only; a qpsmtpd plugin can `require` this file
# and call queue_message().

use strict;
use warnings;
use Fcntl qw(O_CREAT O_DIRECTORY O_EXCL O_RDONLY O_WRONLY);
use File::Spec;
use IO::Handle;
use Time::HiRes qw(gettimeofday);

my $counter = 0;

# A new queue id and the arrival time it encodes.
sub new_queue_id {
    my ($sec, $usec) = gettimeofday();
    my $id = sprintf('%013X-%X-%X', $sec * 1_000_000 + $usec, $$, ++$counter);
    return ($id, sprintf('%d.%06d', $sec, $usec));
}

# An address as the header wants it: UTF-8 bytes in angle brackets. The full syntax check
# (docs/queue-format.md, "Addresses") belongs in the caller, before it accepts the message.
sub angle_path {
    my ($address) = @_;
    utf8::encode($address) if utf8::is_utf8($address);
    $address =~ s/\A<(.*)>\z/$1/s;
    die "address contains CR, LF or NUL\n" if $address =~ /[\r\n\0]/;
    return "<$address>";
}

sub fsync_dir {
    my ($dir) = @_;
    sysopen(my $dh, $dir, O_RDONLY | O_DIRECTORY) or die "cannot open $dir: $!\n";
    $dh->sync or die "cannot fsync $dir: $!\n";
    close $dh;
}

# Queue $message (a byte string) for $sender and the addresses in @$recipients. Returns the
# queue id once the message is durably queued; dies otherwise, and then nothing was queued
# unless only the final directory fsync failed.
sub queue_message {
    my ($spool, $sender, $recipients, $message) = @_;
    die "no recipients\n" unless @$recipients;
    utf8::downgrade($message, 1) or die "message is not a byte string\n";
    my ($id, $arrival) = new_queue_id();
    my $header = "qrouter-queue-file 1\n"
        . "id $id\n"
        . "arrival $arrival\n"
        . "attempts 0\n"
        . 'sender ' . angle_path($sender) . "\n";
    for my $rcpt (@$recipients) {
        my $path = angle_path($rcpt);
        die "<> is not a valid recipient\n" if $path eq '<>';
        $header .= "rcpt $path\n";
    }
    $header .= 'size ' . length($message) . "\n\n";

    my $staged = File::Spec->catfile($spool, 'tmp', $id);
    my $queued = File::Spec->catfile($spool, 'incoming', $id);
    sysopen(my $fh, $staged, O_WRONLY | O_CREAT | O_EXCL, 0660) or die "cannot create $staged: $!\n";
    my $ok = eval {
        local ($,, $\);
        chmod 0660, $fh or die "cannot chmod $staged: $!\n";
        if ($> == 0) {    # as root: the daemon runs as the spool's owner and must read it
            chown((stat $spool)[4], -1, $fh) or die "cannot give $staged to the spool's owner: $!\n";
        }
        binmode $fh;
        print {$fh} $header, $message or die "cannot write $staged: $!\n";
        $fh->flush or die "cannot write $staged: $!\n";
        $fh->sync or die "cannot fsync $staged: $!\n";
        close $fh or die "cannot close $staged: $!\n";
        rename $staged, $queued or die "cannot rename $staged to $queued: $!\n";
        1;
    };
    if (!$ok) {
        my $error = $@;
        close $fh;
        unlink $staged;
        die $error;
    }
    fsync_dir(File::Spec->catdir($spool, 'incoming'));
    return $id;
}

unless (caller) {
    my ($spool, $sender, @recipients) = @ARGV;
    if (!@recipients) {
        print STDERR "usage: $0 SPOOL SENDER RECIPIENT... < message\n";
        exit 64;
    }
    my $valid = eval {
        angle_path($sender);
        for my $rcpt (@recipients) {
            die "<> is not a valid recipient\n" if angle_path($rcpt) eq '<>';
        }
        1;
    };
    if (!$valid) {
        print STDERR "write-queue-file: $@";
        exit 64;
    }
    binmode STDIN;
    my $message = do { local $/; <STDIN> } // '';
    my $id = eval { queue_message($spool, $sender, \@recipients, $message) };
    if (!defined $id) {
        print STDERR "write-queue-file: $@";
        exit 75;
    }
    print "$id\n";
}
