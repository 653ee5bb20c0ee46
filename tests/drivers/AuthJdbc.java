// Logs in through pgwake with pgjdbc (Java, its own SCRAM), for tests/auth_drivers.rs:
// java -cp postgresql.jar AuthJdbc.java. Reads PGW_HOST, PGW_PORT, PGW_USER, PGW_PASSWORD,
// PGW_ENDPOINT; with PGW_CA, TLS (sslmode=verify-full against that CA). Prints
// "ok <current_user> <tls>" or "error <SQLSTATE>".
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.Properties;

public class AuthJdbc {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + env("PGW_HOST") + ":" + env("PGW_PORT") + "/postgres";
        Properties p = new Properties();
        p.setProperty("user", env("PGW_USER"));
        p.setProperty("password", env("PGW_PASSWORD"));
        p.setProperty("options", "endpoint=" + env("PGW_ENDPOINT"));
        p.setProperty("connectTimeout", "60");
        p.setProperty("loginTimeout", "60");
        String ca = System.getenv("PGW_CA");
        boolean tls = ca != null && !ca.isEmpty();
        if (tls) {
            p.setProperty("sslmode", "verify-full");
            p.setProperty("sslrootcert", ca);
        } else {
            p.setProperty("sslmode", "disable");
        }
        Connection c;
        try {
            c = DriverManager.getConnection(url, p);
        } catch (SQLException e) {
            if (e.getSQLState() == null) throw e;
            System.out.println("error " + e.getSQLState());
            return;
        }
        try (c; ResultSet rs = c.createStatement().executeQuery("select current_user")) {
            rs.next();
            // sslmode=verify-full fails rather than fall back to plaintext.
            System.out.println("ok " + rs.getString(1) + " " + tls);
        }
    }

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null) throw new IllegalArgumentException(name + " is not set");
        return v;
    }
}
